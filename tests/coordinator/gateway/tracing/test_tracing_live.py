"""Issue 13 §2 through the real gateway and real embedded engines (P/D), the `openai` client:
every request's spans with the OTel GenAI conventions and meshd's own (routing decision with
scores, P/D mode, prefill / transfer / decode phases, worker and node ids), the client's W3C
trace continued (its trace id, the request span a child of its span), the trace id in the
response, and the sampler honoured. The spans go to an in-memory exporter in place of OTLP.
Every request, sampled or not, leaves a record in the replica's store (`/debug/requests`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from support.control import wait_for
from support.mesh import engines
from support.net import free_port

from meshd.capabilities import Member
from meshd.coordinator.gateway.config import (
    GatewayConfig,
    RecordsConfig,
    RoutingConfig,
    TracingConfig,
)
from meshd.coordinator.gateway.runtime import GatewayRuntime
from meshd.scheduler.pd import PDConfig

PROMPT = "Trace this request from the client through prefill, transfer and decode. " * 3
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    with engines([("p0", "prefill"), ("d0", "decode")], tmp_path) as procs:
        async def membership() -> list[Member]:
            return [Member(f"n-{p.worker.worker_id}", p.worker) for p in procs]

        exporter = InMemorySpanExporter()
        rt = GatewayRuntime(GatewayConfig(
            port=free_port(), membership_interval_s=60,
            routing=RoutingConfig(scrape_interval_s=0.1, pd=PDConfig(min_uncached_tokens=0)),
            tracing=TracingConfig(export_interval_s=0.1),
            records=RecordsConfig(dir=str(tmp_path / "records"), flush_interval_s=0.1)),
            membership, span_exporter=exporter)
        await rt.start()
        c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{rt.config.port}/v1",
                               api_key="none", max_retries=0, timeout=60)
        try:
            yield {"rt": rt, "client": c, "exporter": exporter}
        finally:
            await c.close()
            await rt.stop(2)


async def spans_of(m: dict[str, Any], trace_hex: str, n: int) -> list[ReadableSpan]:
    def mine() -> list[ReadableSpan]:
        return [s for s in m["exporter"].get_finished_spans()
                if s.context is not None and f"{s.context.trace_id:032x}" == trace_hex]

    await wait_for(lambda: len(mine()) >= n, 10)
    return mine()


async def test_a_request_is_traced_from_the_client_to_the_workers(mesh: dict[str, Any]) -> None:
    c: openai.AsyncOpenAI = mesh["client"]
    raw = await c.chat.completions.with_raw_response.create(
        model="meshd-tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=6,
        temperature=0.5, top_p=0.9, seed=3,
        extra_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
    out = raw.parse()
    assert raw.headers["x-meshd-trace-id"] == CLIENT_TRACE
    spans = await spans_of(mesh, CLIENT_TRACE, 4)
    by_name = {s.name: s for s in spans}
    root = by_name["chat meshd-tiny"]
    assert root.kind is SpanKind.SERVER
    assert root.parent is not None and f"{root.parent.span_id:016x}" == CLIENT_SPAN
    a = dict(root.attributes or {})
    assert out.usage is not None
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "meshd-tiny"
    assert a["gen_ai.usage.input_tokens"] == out.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == out.usage.completion_tokens == 6
    assert a["gen_ai.request.max_tokens"] == 6 and a["gen_ai.request.temperature"] == 0.5
    assert a["gen_ai.request.top_p"] == 0.9 and a["gen_ai.request.seed"] == 3
    assert list(a["gen_ai.response.finish_reasons"]) == ["length"]
    assert a["gen_ai.response.id"] == out.id and a["meshd.pd.mode"] == "disaggregated"
    assert a["http.response.status_code"] == 200 and a["meshd.outcome"] == "ok"
    assert 0 < a["meshd.ttft_s"] < 60

    prefill, decode = by_name["prefill p0"], by_name["decode d0"]
    transfer = by_name["kv_transfer"]
    for child in (prefill, decode):
        assert child.kind is SpanKind.CLIENT and child.parent is not None
        assert child.parent.span_id == root.context.span_id  # type: ignore[union-attr]
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time  # type: ignore[operator]
    assert transfer.parent is not None
    assert transfer.parent.span_id == decode.context.span_id  # type: ignore[union-attr]
    assert prefill.end_time <= transfer.start_time  # type: ignore[operator]
    pa, da = dict(prefill.attributes or {}), dict(decode.attributes or {})
    assert pa["meshd.node.id"] == "n-p0" and da["meshd.node.id"] == "n-d0"
    assert pa["meshd.route.disaggregated"] is True and pa["meshd.route.decode"] == "d0"
    assert "d0" in pa["meshd.route.decode_scores"] and "p0" in pa["meshd.route.prefill_scores"]
    assert da["gen_ai.usage.output_tokens"] == 6 and da["meshd.outcome"] == "ok"


async def test_without_a_traceparent_a_new_trace_starts(mesh: dict[str, Any]) -> None:
    c: openai.AsyncOpenAI = mesh["client"]
    for bad in ({}, {"traceparent": "not-a-traceparent"},
                {"traceparent": f"00-{'0' * 32}-{CLIENT_SPAN}-01"}):
        raw = await c.completions.with_raw_response.create(
            model="meshd-tiny", prompt=PROMPT, max_tokens=2, extra_headers=bad)
        trace = raw.headers["x-meshd-trace-id"]
        assert len(trace) == 32 and trace != CLIENT_TRACE and int(trace, 16)
        (root, *_) = [s for s in await spans_of(mesh, trace, 1) if s.kind is SpanKind.SERVER]
        assert root.parent is None and root.name == "text_completion meshd-tiny"


async def test_a_client_that_does_not_sample_is_not_exported(mesh: dict[str, Any]) -> None:
    """parentbased_always_on: the client's sampled flag 00 is honoured (the trace id still
    flows, so workers and logs can join it); its spans are not exported."""
    c: openai.AsyncOpenAI = mesh["client"]
    unsampled = "a" * 32
    raw = await c.completions.with_raw_response.create(
        model="meshd-tiny", prompt=PROMPT, max_tokens=2,
        extra_headers={"traceparent": f"00-{unsampled}-{CLIENT_SPAN}-00"})
    assert raw.headers["x-meshd-trace-id"] == unsampled
    sampled = "b" * 32
    await c.completions.create(model="meshd-tiny", prompt=PROMPT, max_tokens=2,
                               extra_headers={"traceparent": f"00-{sampled}-{CLIENT_SPAN}-01"})
    await spans_of(mesh, sampled, 1)  # exported after the unsampled one was finished
    assert not [s for s in mesh["exporter"].get_finished_spans()
                if s.context is not None and f"{s.context.trace_id:032x}" == unsampled]
    rt: GatewayRuntime = mesh["rt"]
    assert rt.traces.describe()["exported"] == 1  # traces: the sampled one only


async def get_json(m: dict[str, Any], path: str) -> Any:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{m['rt'].config.port}{path}") as r:
        return r.status, await r.json()


async def test_every_request_leaves_a_record(mesh: dict[str, Any]) -> None:
    c: openai.AsyncOpenAI = mesh["client"]
    raw = await c.completions.with_raw_response.create(
        model="meshd-tiny", prompt=PROMPT + " (recorded)", max_tokens=3, temperature=0)
    out = raw.parse()
    with pytest.raises(openai.NotFoundError):
        await c.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    rid = raw.headers["x-request-id"]

    async def found() -> Any:
        return (await get_json(mesh, f"/debug/requests?request_id={rid}"))[1]["record"]

    for _ in range(100):  # flushed every 0.1 s
        rec = await found()
        if rec is not None:
            break
        await asyncio.sleep(0.05)
    assert rec is not None
    assert out.usage is not None
    assert rec["trace_id"] == raw.headers["x-meshd-trace-id"] and rec["outcome"] == "ok"
    assert rec["status"] == 200 and rec["mode"] == "disaggregated"
    assert rec["prompt_tokens"] == out.usage.prompt_tokens and rec["completion_tokens"] == 3
    assert rec["prefill_workers"] == "p0" and rec["decode_workers"] == "d0"
    assert rec["nodes"] == "n-d0,n-p0" and rec["endpoint"] == "completions"
    assert rec["ttft_s"] is not None and 0 < rec["ttft_s"] <= rec["e2e_s"]
    await asyncio.sleep(0.3)
    status, listed = await get_json(mesh, "/debug/requests?outcome=error")
    assert status == 200 and [r["model"] for r in listed["records"]] == ["no-such-model"]
    assert listed["records"][0]["status"] == 404
    _, hours = await get_json(mesh, "/debug/requests?rollups=1")
    (hour,) = [h for h in hours["rollups"] if h["model"] == "meshd-tiny"]
    assert hour["requests"] >= 1 and hour["completion_tokens"] >= 3
    status, bad = await get_json(mesh, "/debug/requests?limit=many")
    assert status == 400 and bad["error"]["code"] == "invalid_query"
    status, bad = await get_json(mesh, "/debug/requests?outcom=error")  # misspelt filter
    assert status == 400 and bad["error"]["param"] == "outcom"
    assert "outcome" in bad["error"]["message"]



async def test_spans_reach_an_otlp_collector(tmp_path: Path) -> None:
    """`otlp_endpoint` set: the real OTLP/HTTP exporter posts protobuf to a collector (here a
    loopback HTTP server decoding `ExportTraceServiceRequest`)."""
    from aiohttp import web
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    got: list[ExportTraceServiceRequest] = []

    async def traces(request: web.Request) -> web.Response:
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(await request.read())
        got.append(msg)
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        with engines([("b0", "both")], tmp_path) as [b0]:
            async def membership() -> list[Member]:
                return [Member("n-b0", b0.worker)]

            rt = GatewayRuntime(GatewayConfig(
                port=free_port(), membership_interval_s=60,
                tracing=TracingConfig(otlp_endpoint=f"http://127.0.0.1:{port}/v1/traces",
                                      export_interval_s=0.1, service_name="meshd-test")),
                membership)
            await rt.start()
            c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{rt.config.port}/v1",
                                   api_key="none", max_retries=0, timeout=60)
            try:
                raw = await c.completions.with_raw_response.create(
                    model="meshd-tiny", prompt=PROMPT, max_tokens=2)
                await wait_for(lambda: bool(got), 15)
            finally:
                await c.close()
                await rt.stop(2)
    finally:
        await runner.cleanup()
    (rs, *_) = got[0].resource_spans
    service = {kv.key: kv.value.string_value for kv in rs.resource.attributes}
    assert service["service.name"] == "meshd-test"
    names = {s.name: s for ss in rs.scope_spans for s in ss.spans}
    root = names["text_completion meshd-tiny"]
    assert root.trace_id.hex() == raw.headers["x-meshd-trace-id"]
    attrs = {kv.key: kv.value for kv in root.attributes}
    assert attrs["gen_ai.usage.output_tokens"].int_value == 2
    assert "decode b0" in names
