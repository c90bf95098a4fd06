"""The handler's side of tracing: a trace context per request, and where finished ones go.

    trace = tracer.begin(req, now)      # the client's trace continued, or a new one
    ...                                 # the choice runs record their worker calls
    tracer.finished(trace)              # closed: to the span exporter and the record store

Every request gets a context (its ids cost ~1 µs) and a record; `sampled` ones also get spans.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from meshd.coordinator.gateway.http.api_request import ApiRequest
from meshd.coordinator.gateway.tracing.context import Sampler
from meshd.coordinator.gateway.tracing.trace import RequestTrace

Sink = Callable[[RequestTrace], None]


class Tracer:
    def __init__(self, sampler: Sampler, sinks: Sequence[Sink] = ()) -> None:
        self.sampler = sampler
        self.sinks = list(sinks)

    def begin(self, req: ApiRequest, now: float) -> RequestTrace:
        return RequestTrace(self.sampler.begin(req.traceparent), req, now)

    def finished(self, trace: RequestTrace) -> None:
        for sink in self.sinks:
            sink(trace)
