"""Tracing costs (issue 13 §2), in process: what a request pays on the gateway's loop for its
trace context (the sampler's ids, a `traceparent` per worker call, the call records, closing
the trace), and what the sink's thread pays per request: settling it into a record-store row
(`settle_and_record_us` includes the request-path part again), building its spans and
encoding them as OTLP protobuf (the bytes a collector receives; the network write not
included).

    .venv/bin/python benchmarks/tracing.py [--rounds 5] [--n 5000]

A disaggregated request: one prefill call, one decode stream of 16 tokens, a KV transfer phase.
Prints CPU µs per request (median of rounds, thread CPU clock) and writes
benchmarks/results/tracing.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource

from meshd.coordinator.gateway.http.api_request import ApiRequest, Endpoint
from meshd.coordinator.gateway.http.openai_api import parse_chat
from meshd.coordinator.gateway.serving.lifecycle import Phase
from meshd.coordinator.gateway.serving.shapes import ChoiceOutput
from meshd.coordinator.gateway.tracing.context import Sampler
from meshd.coordinator.gateway.tracing.spans import request_spans
from meshd.coordinator.gateway.tracing.trace import Call, RequestTrace
from meshd.scheduler.types import Decision

ROOT = Path(__file__).resolve().parents[1]
HEADER = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
PAYLOAD = {"model": "m", "messages": [{"role": "user", "content": "Say hello."}],
           "max_tokens": 16, "temperature": 0.5}


def request(traceparent: bytes | None) -> ApiRequest:
    from meshd.config import GatewayConfig

    body = parse_chat(PAYLOAD, GatewayConfig().limits)
    return ApiRequest(Endpoint.CHAT, "r1", body, PAYLOAD, b"", "bench", 0.0,
                      traceparent=traceparent)


def run_like(trace: RequestTrace, t0: float) -> Any:
    """A finished disaggregated choice as the trace sees one (its calls recorded the way
    `ChoiceRun` records them)."""
    ctx = trace.ctx
    calls = []
    for kind, worker, start, end, tokens in (("prefill", "p0", t0 + 0.001, t0 + 0.010, 0),
                                             ("decode", "d0", t0 + 0.010, t0 + 0.050, 16)):
        span, _tp = ctx.child()
        c = Call(kind, worker, span, start)
        c.finish(end, "ok", tokens)
        calls.append(c)
    history = [(Phase.ADMITTED, t0, ""), (Phase.PREFILL, t0 + 0.001, "p0"),
               (Phase.TRANSFER, t0 + 0.010, "d0"), (Phase.DECODE, t0 + 0.012, "first token"),
               (Phase.DONE, t0 + 0.050, "")]
    out = ChoiceOutput(token_ids=list(range(16)), finish_reason="length", cached_tokens=0)
    decision = Decision("p0", "d0", True, 0, {"d0": 2.5, "d1": 1.0}, {"p0": 3.0})
    return SimpleNamespace(calls=calls, out=out, decision=decision,
                           lc=SimpleNamespace(history=history, decode_attempts=1))


def cpu_us(fn: Any, n: int) -> float:
    t0 = time.thread_time_ns()
    for _ in range(n):
        fn()
    return (time.thread_time_ns() - t0) / n / 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=5000)
    a = ap.parse_args()
    sampler = Sampler()
    req = request(HEADER)
    resource = Resource.create({"service.name": "meshd-gateway"})

    def hot() -> RequestTrace:  # what the request path does
        t = RequestTrace(sampler.begin(req.traceparent), req, 0.0)
        t.runs = [run_like(t, 0.0)]
        t.prompt_tokens = 12
        t.close(0.06, 200, "ok")
        return t

    def context_only() -> Any:  # ids and two traceparent values, no records
        ctx = sampler.begin(req.traceparent)
        return ctx.child(), ctx.child()

    def traced() -> Any:  # what tracing adds to a request: the trace, two call records, close
        t = RequestTrace(sampler.begin(req.traceparent), req, 0.0)
        for kind, worker in (("prefill", "p0"), ("decode", "d0")):
            span, _tp = t.ctx.child()
            c = Call(kind, worker, span, 0.01)
            c.finish(0.02, "ok", 16)
        t.close(0.06, 200, "ok")
        return t

    done = hot()
    done.settle()

    def record() -> Any:  # the sink thread: the choices summed, the record store's row
        t = hot()
        t.settle()
        return t.record(lambda w: f"n-{w}")

    def build() -> Any:
        return request_spans(done, resource, lambda w: f"n-{w}")

    spans = build()

    def encode() -> Any:
        return encode_spans(spans).SerializeToString()

    rows = {name: statistics.median(cpu_us(fn, a.n) for _ in range(a.rounds))
            for name, fn in (("context_and_traceparents_us", context_only),
                             ("request_path_us", traced), ("settle_and_record_us", record),
                             ("build_spans_us", build),
                             ("otlp_encode_us", encode))}
    rows["spans_per_request"] = len(spans)
    rows["otlp_bytes_per_request"] = len(encode())
    print("CPU µs per request (median of rounds)")
    for k, v in rows.items():
        print(f"  {k:<30}{v:>10.1f}" if isinstance(v, float) else f"  {k:<30}{v:>10}")
    out = ROOT / "benchmarks" / "results" / "tracing.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rounds": a.rounds, "n": a.n, **rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
