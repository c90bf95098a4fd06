"""OpenAI-shaped API errors: the one exception type the gateway turns into an HTTP error reply.

Raise `ApiError` (or use the helpers) anywhere between request parsing and the first byte of a
response; the server encodes it as ``{"error": {"message", "type", "param", "code"}}`` with the
given status. The class lives in `meshd.api_errors` (the embedded engine's worker server raises
the same one) and is re-exported here with the gateway's helpers. The lifecycle uses
`rate_limited`, `unavailable` and `gateway_timeout` for 429, 503 and 504.
"""

from __future__ import annotations

from meshd.api_errors import ApiError, invalid

__all__ = ["ApiError", "bad_gateway", "gateway_timeout", "internal", "invalid",
           "method_not_allowed", "not_found", "rate_limited", "too_large", "unauthorized",
           "unavailable", "unsupported_media_type"]


def unauthorized() -> ApiError:
    return ApiError(401, "Invalid or missing API key (send 'Authorization: Bearer <key>').",
                    err_type="authentication_error", code="invalid_api_key")


def not_found(path: str) -> ApiError:
    return ApiError(404, f"Unknown route {path!r}.", err_type="not_found_error",
                    code="not_found")


def method_not_allowed(method: str, path: str) -> ApiError:
    return ApiError(405, f"Method {method} is not allowed on {path!r}.",
                    code="method_not_allowed")


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"Request body exceeds the limit of {limit} bytes.",
                    code="request_too_large")


def unsupported_media_type(content_type: str) -> ApiError:
    return ApiError(415, f"Content-Type must be application/json, got {content_type!r}.",
                    code="unsupported_media_type")


def rate_limited(message: str = "Too many requests; retry later.",
                 retry_after: float | None = 1.0) -> ApiError:
    """429 for admission control; `retry_after` (seconds) becomes a Retry-After header."""
    return ApiError(429, message, err_type="rate_limit_error", code="rate_limit_exceeded",
                    retry_after=retry_after)


def unavailable(message: str = "No worker is available for this request.",
                retry_after: float | None = None) -> ApiError:
    """503: no healthy worker, or the gateway is draining."""
    return ApiError(503, message, err_type="server_error", code="service_unavailable",
                    retry_after=retry_after)


def gateway_timeout(message: str = "The worker did not answer in time.") -> ApiError:
    """504: a deadline towards a worker passed."""
    return ApiError(504, message, err_type="server_error", code="timeout")


def bad_gateway(message: str = "The worker failed.") -> ApiError:
    """502: a worker answered with a protocol error or vanished mid-request."""
    return ApiError(502, message, err_type="server_error", code="bad_gateway")


def internal(message: str = "Internal gateway error.") -> ApiError:
    return ApiError(500, message, err_type="server_error", code="internal_error")
