"""What one request leaves for its trace and its record: `RequestTrace`, filled in as it runs.

The handler opens one per request (`Tracer.begin`), the choice runs append a `Call` per worker
call (prefill, decode stream: which worker, the span id its `traceparent` named, start, end,
outcome, tokens), and the handler closes it with the end, status and outcome. Nothing more
happens on the request path: on the sink's thread `settle()` sums the choices, `spans.py`
turns the trace into OpenTelemetry spans and `record()` into the record store's row. Times are
the gateway's monotonic clock; `wall_ns` anchors them to the wall clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from meshd.coordinator.gateway.records.record import RequestRecord
from meshd.coordinator.gateway.tracing.context import TraceContext

if TYPE_CHECKING:
    from meshd.coordinator.gateway.http.api_request import ApiRequest
    from meshd.coordinator.gateway.serving.choice import ChoiceRun


class Call:
    """One worker call of a choice: a span of the trace."""

    __slots__ = ("end", "kind", "outcome", "span_id", "start", "start_tokens", "tokens",
                 "worker_id")

    def __init__(self, kind: str, worker_id: str, span_id: int, start: float,
                 start_tokens: int = 0) -> None:
        self.kind, self.worker_id, self.span_id = kind, worker_id, span_id
        self.start, self.start_tokens = start, start_tokens
        self.end = 0.0  # 0: still open (closed at the request's end as cancelled)
        self.outcome = ""
        self.tokens = 0

    def finish(self, now: float, outcome: str, tokens_now: int = 0) -> None:
        if not self.end:
            self.end, self.outcome = now, outcome
            self.tokens = max(0, tokens_now - self.start_tokens)


class RequestTrace:
    """One request's facts for its spans and its record."""

    __slots__ = ("cached_tokens", "completion_tokens", "ctx", "end", "finish_reasons",
                 "mode", "outcome", "passthrough", "prompt_tokens", "req", "runs", "settled",
                 "start", "status", "tenant", "ttft", "wall_ns")

    def __init__(self, ctx: TraceContext, req: ApiRequest, start: float) -> None:
        self.ctx, self.req, self.start = ctx, req, start
        self.wall_ns = time.time_ns() - int((time.monotonic() - start) * 1e9)
        self.tenant = req.tenant or ""
        self.runs: Sequence[ChoiceRun] = ()
        self.end = 0.0
        self.status = 0
        self.outcome = ""
        self.ttft: float | None = None
        self.prompt_tokens = self.cached_tokens = self.completion_tokens = 0
        self.finish_reasons: tuple[str, ...] = ()
        self.passthrough = False
        self.mode = ""
        self.settled = False

    def ns(self, t: float) -> int:
        """Wall-clock nanoseconds of a monotonic time of this request."""
        return self.wall_ns + int((t - self.start) * 1e9)

    def close(self, now: float, status: int, outcome: str) -> None:
        """The request ended (on the request path: nothing more)."""
        self.end, self.status, self.outcome = now, status, outcome

    def settle(self) -> None:
        """Sum the finished choices (once, off the request path); calls still open were cut
        by the request's end."""
        if self.settled:
            return
        self.settled = True
        now = self.end
        completion = cached = 0
        reasons = []
        modes = set()
        for r in self.runs:
            for c in r.calls:
                c.finish(now, "cancelled", len(r.out.token_ids))
            completion += len(r.out.token_ids)
            cached = max(cached, r.out.cached_tokens)
            reasons.append(r.out.finish_reason or "")
            if r.decision is not None:
                modes.add("disaggregated" if r.decision.disaggregated and
                          any(c.kind == "prefill" and c.outcome == "ok" for c in r.calls)
                          else "local")
        if self.runs:
            self.completion_tokens, self.cached_tokens = completion, cached
            self.finish_reasons = tuple(reasons)
            self.mode = modes.pop() if len(modes) == 1 else "mixed" if modes else ""
        elif self.passthrough:
            self.mode = "passthrough"

    def record(self, node_of: Callable[[str], str] = lambda _w: "") -> RequestRecord:
        """The request's row in the record store (`records/`); `node_of(worker)`: its node."""
        prefill: list[str] = []
        decode: list[str] = []
        for r in self.runs:
            for c in r.calls:
                (prefill if c.kind == "prefill" else decode).append(c.worker_id)
        retries = sum(max(0, r.lc.decode_attempts - 1) for r in self.runs) + \
            sum(1 for r in self.runs for c in r.calls if c.kind == "prefill" and c.outcome != "ok")
        nodes = {node_of(w) for w in (*prefill, *decode)} - {""}
        return RequestRecord(
            request_id=self.req.request_id, trace_id=self.ctx.trace_hex,
            started_at=self.wall_ns / 1e9, tenant=self.tenant, model=self.req.body.model,
            endpoint="chat" if self.req.endpoint.name == "CHAT" else "completions",
            outcome=self.outcome, status=self.status, mode=self.mode,
            prompt_tokens=self.prompt_tokens, cached_tokens=self.cached_tokens,
            completion_tokens=self.completion_tokens, ttft_s=self.ttft,
            e2e_s=max(0.0, self.end - self.start), prefill_workers=",".join(prefill),
            decode_workers=",".join(decode), nodes=",".join(sorted(nodes)), retries=retries,
            choices=self.req.body.sampling.n)

    def attributes(self) -> dict[str, Any]:
        """The request span's attributes: OTel GenAI semantic conventions, then meshd's."""
        body = self.req.body
        s = body.sampling
        op = "chat" if self.req.endpoint.name == "CHAT" else "text_completion"
        out: dict[str, Any] = {
            "gen_ai.operation.name": op, "gen_ai.provider.name": "meshd",
            "gen_ai.request.model": body.model, "gen_ai.response.model": body.model,
            "gen_ai.request.choice.count": s.n,
            "gen_ai.usage.input_tokens": self.prompt_tokens,
            "gen_ai.usage.output_tokens": self.completion_tokens,
            "meshd.request_id": self.req.request_id, "meshd.stream": body.stream,
            "meshd.outcome": self.outcome, "http.response.status_code": self.status,
            "meshd.usage.cached_tokens": self.cached_tokens}
        if self.runs:
            out["gen_ai.response.id"] = ("chatcmpl-" if op == "chat" else "cmpl-") + \
                self.req.request_id
            out["gen_ai.response.finish_reasons"] = list(self.finish_reasons)
        for key, value in (("max_tokens", s.max_tokens), ("temperature", s.temperature),
                           ("top_p", s.top_p), ("seed", s.seed)):
            if value is not None:
                out[f"gen_ai.request.{key}"] = value
        if s.stop:
            out["gen_ai.request.stop_sequences"] = list(s.stop)
        if self.tenant:
            out["meshd.tenant"] = self.tenant
        if self.mode:
            out["meshd.pd.mode"] = self.mode
        if self.ttft is not None:
            out["meshd.ttft_s"] = round(self.ttft, 6)
        retries = sum(r.lc.decode_attempts - 1 for r in self.runs if r.lc.decode_attempts)
        out["meshd.continuations"] = max(0, retries)
        out["meshd.prefill_attempts"] = sum(1 for r in self.runs for c in r.calls
                                            if c.kind == "prefill")
        if self.outcome != "ok":
            out["error.type"] = self.outcome if self.status < 400 else str(self.status)
        return out
