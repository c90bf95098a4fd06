"""A closed `RequestTrace` as OpenTelemetry spans (OTel GenAI semantic conventions + meshd's).

    request span  "chat <model>"             SERVER  gen_ai.*, meshd.tenant, meshd.pd.mode ...
      ├─ "prefill <worker>"                  CLIENT  the remote prefill call
      ├─ "decode <worker>"                   CLIENT  a decode stream (one per continuation)
      │    └─ "kv_transfer"                  INTERNAL from the stream's start to its first
      │                                               token, when it pulled P's KV
      └─ ...

Worker call spans carry the span id the worker got in its `traceparent`, so a worker that
traces joins under them. Each choice's first call names the routing decision: the picks,
whether it was disaggregated, the prefix the pick caches, and the top decode scores. Spans are
built here, on the exporter's thread, as SDK `ReadableSpan`s with the gateway's own ids and
times (no tracer on the request path).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from meshd.coordinator.gateway.serving.lifecycle import Phase
from meshd.coordinator.gateway.tracing.context import new_span_id
from meshd.coordinator.gateway.tracing.trace import Call, RequestTrace

if TYPE_CHECKING:
    from meshd.coordinator.gateway.serving.choice import ChoiceRun

SCOPE = InstrumentationScope("meshd.gateway", "1")
TOP_SCORES = 4  # decode candidates named in a routing decision's attribute
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_OK, _ERROR = Status(StatusCode.UNSET), Status(StatusCode.ERROR)


def request_spans(t: RequestTrace, resource: Resource,
                  node_of: Callable[[str], str] = lambda _w: "") -> list[ReadableSpan]:
    """The request's spans, the request span first. `node_of(worker id)`: its node id."""
    trace_id = t.ctx.trace_id
    ctx = SpanContext(trace_id, t.ctx.span_id, False, _SAMPLED)
    parent = (SpanContext(trace_id, t.ctx.parent_span_id, True, _SAMPLED)
              if t.ctx.parent_span_id else None)
    attrs = t.attributes()
    name = f"{attrs['gen_ai.operation.name']} {attrs['gen_ai.request.model']}"
    out = [ReadableSpan(name, ctx, parent, resource, attrs, kind=SpanKind.SERVER,
                        status=_OK if t.outcome == "ok" else _ERROR,
                        start_time=t.ns(t.start), end_time=t.ns(t.end or t.start),
                        instrumentation_scope=SCOPE)]
    model = attrs["gen_ai.request.model"]
    for i, run in enumerate(t.runs):
        for k, call in enumerate(run.calls):
            a = _call_attributes(call, model, i, node_of(call.worker_id))
            if k == 0:
                a.update(_route(run))
            span = SpanContext(trace_id, call.span_id, False, _SAMPLED)
            out.append(ReadableSpan(f"{call.kind} {call.worker_id}", span, ctx, resource, a,
                                    kind=SpanKind.CLIENT,
                                    status=_OK if call.outcome == "ok" else _ERROR,
                                    start_time=t.ns(call.start),
                                    end_time=t.ns(call.end or t.end),
                                    instrumentation_scope=SCOPE))
            if call.kind == "decode":
                out.extend(_transfer(t, run, call, span, resource))
    return out


def _call_attributes(call: Call, model: str, choice: int, node: str) -> dict[str, Any]:
    a: dict[str, Any] = {"gen_ai.operation.name": "text_completion",
                         "gen_ai.provider.name": "meshd", "gen_ai.request.model": model,
                         "meshd.phase": call.kind, "meshd.choice": choice,
                         "meshd.worker.id": call.worker_id, "meshd.outcome": call.outcome}
    if node:
        a["meshd.node.id"] = node
    if call.kind == "decode":
        a["gen_ai.usage.output_tokens"] = call.tokens
        a["meshd.decode.first_token_index"] = call.start_tokens
    return a


def _route(run: ChoiceRun) -> dict[str, Any]:
    d = run.decision
    if d is None:
        return {}
    a: dict[str, Any] = {"meshd.route.decode": d.decode, "meshd.route.prefill": d.prefill,
                         "meshd.route.disaggregated": d.disaggregated,
                         "meshd.route.cached_tokens": d.cached_tokens}
    if d.decode_scores:
        a["meshd.route.decode_scores"] = _top(d.decode_scores)
    if d.prefill_scores:
        a["meshd.route.prefill_scores"] = _top(d.prefill_scores)
    return a


def _top(scores: Mapping[str, float]) -> str:
    best = sorted(scores.items(), key=lambda kv: -kv[1])[:TOP_SCORES]
    return orjson.dumps({w: round(s, 4) for w, s in best}).decode()


def _transfer(t: RequestTrace, run: ChoiceRun, call: Call, parent: SpanContext,
              resource: Resource) -> list[ReadableSpan]:
    """The KV pull inside a decode stream: from the stream's start (the lifecycle enters
    TRANSFER just before it) until the phase after TRANSFER (the first token)."""
    hist = run.lc.history
    end = call.end or t.end
    for j, (phase, at, _note) in enumerate(hist):
        until = hist[j + 1][1] if j + 1 < len(hist) else end
        if phase is Phase.TRANSFER and at <= end and until >= call.start:
            ctx = SpanContext(t.ctx.trace_id, new_span_id(), False, _SAMPLED)
            return [ReadableSpan("kv_transfer", ctx, parent, resource,
                                 {"meshd.phase": "transfer", "meshd.worker.id": call.worker_id},
                                 kind=SpanKind.INTERNAL, start_time=t.ns(max(at, call.start)),
                                 end_time=t.ns(min(until, end)), instrumentation_scope=SCOPE)]
    return []
