"""Request tracing at the gateway: W3C trace context, OpenTelemetry spans (GenAI conventions)."""
