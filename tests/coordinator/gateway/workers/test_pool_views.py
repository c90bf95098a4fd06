"""The live pool feeds every `WorkerView` field: a worker that reports every signal over real
HTTP yields a view in which no field is left at its dataclass default."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from support.net import free_port

from meshd import capabilities as caps
from meshd.coordinator.gateway.config import RoutingConfig
from meshd.coordinator.gateway.workers.pool import WorkerPool
from meshd.scheduler.types import Role, WorkerView

MODEL = "moe"
GAUGES = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="moe"}} {running}
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="moe"}} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="moe"}} 0.25
"""
QUEUED = """\
# TYPE meshd_engine_queued_prefill_tokens gauge
meshd_engine_queued_prefill_tokens{{engine="0",model_name="moe"}} {queued}
"""
HISTOGRAMS = """\
# TYPE vllm:request_prefill_time_seconds histogram
vllm:request_prefill_time_seconds_sum {prefill_s}
vllm:request_prefill_time_seconds_count {n}
vllm:request_prefill_time_seconds_bucket{{le="+Inf"}} {n}
# TYPE vllm:request_prompt_tokens histogram
vllm:request_prompt_tokens_sum {prompt}
vllm:request_prompt_tokens_count {n}
vllm:request_prompt_tokens_bucket{{le="+Inf"}} {n}
# TYPE vllm:inter_token_latency_seconds histogram
vllm:inter_token_latency_seconds_sum {itl_s}
vllm:inter_token_latency_seconds_count {gaps}
vllm:inter_token_latency_seconds_bucket{{le="+Inf"}} {gaps}
"""
# Fields a fully reporting, serving worker legitimately leaves at the default, and why.
DEFAULT_OK = {"healthy": "a serving worker is healthy (the default, True); "
                         "test_failed_worker_is_unhealthy_until_its_backoff_ends feeds False"}


class MetricsServer:
    """A worker's `/metrics` on loopback, whose text the test rewrites."""

    def __init__(self) -> None:
        self.text = ""
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.text, content_type="text/plain")


@pytest.fixture
async def server() -> AsyncIterator[MetricsServer]:
    s = MetricsServer()
    await s.start()
    yield s
    assert s.runner is not None
    await s.runner.cleanup()


def make_member(port: int, zone: str = "eu-1") -> caps.Member:
    w = caps.Worker("w0", f"http://127.0.0.1:{port}", "decode", MODEL, kv_block_size=32,
                    kv_capacity_blocks=400)
    return caps.Member("node-1", w, {"zone": zone},
                       tuple(caps.Experts(MODEL, "w0", layer, (4, 5, 6, 7)) for layer in range(2)))


def make_pool(**routing: object) -> WorkerPool:
    cfg = RoutingConfig(cost={MODEL: {"decode_ms_per_seq": 0.5}}, **routing)
    return WorkerPool(routing=cfg, follow_events=False)


def field_default(f: dataclasses.Field[object]) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


async def test_every_view_field_is_fed_live(server: MetricsServer) -> None:
    server.text = GAUGES.format(running=3) + QUEUED.format(queued=900)
    pool = make_pool()
    try:
        pool.update([make_member(server.port)])
        await pool.scrape_once()
        [view] = pool.views()
    finally:
        await pool.close()
    assert view == WorkerView(
        worker_id="w0", role=Role.DECODE, model=MODEL, healthy=True, num_running=3,
        num_waiting=2, kv_usage=0.25, kv_capacity_blocks=400, block_size=32, node_id="node-1",
        attributes={"zone": "eu-1"}, experts=frozenset({4, 5, 6, 7}),
        cost={"decode_ms_per_seq": 0.5}, num_waiting_tokens=900)
    for f in dataclasses.fields(WorkerView):
        default = field_default(f)
        if f.name in DEFAULT_OK or default is dataclasses.MISSING:
            continue
        assert getattr(view, f.name) != default, (
            f"WorkerView.{f.name} is left at its default by the live pool: feed it in "
            f"WorkerPool (or list it in DEFAULT_OK with the reason)")


async def test_failed_worker_is_unhealthy_until_its_backoff_ends(server: MetricsServer) -> None:
    server.text = GAUGES.format(running=0)
    pool = make_pool(failure_backoff_s=0.05)
    try:
        pool.update([make_member(server.port)])
        pool.mark_failed("w0")
        assert not pool.views()[0].healthy
        await asyncio.sleep(0.06)
        assert pool.views()[0].healthy
    finally:
        await pool.close()


async def test_queued_tokens_gauge_or_own_estimate_whichever_is_larger(
        server: MetricsServer) -> None:
    server.text = GAUGES.format(running=1)  # a vLLM worker: no queued-token gauge
    pool = make_pool()
    try:
        pool.update([make_member(server.port)])
        await pool.scrape_once()
        first = pool.views()[0]
        assert first.num_waiting_tokens == 0
        a = pool.prefill_started("w0", 500)
        b = pool.prefill_started("w0", 300)
        assert pool.views()[0].num_waiting_tokens == 800
        pool.prefill_done(a)
        pool.prefill_done(a)  # idempotent
        assert pool.views()[0].num_waiting_tokens == 300
        server.text = GAUGES.format(running=1) + QUEUED.format(queued=900)
        await pool.scrape_once()
        assert pool.views()[0].num_waiting_tokens == 900  # the gauge, larger than ours
        c = pool.prefill_started("w0", 2000)  # dispatched since the scrape
        assert pool.views()[0].num_waiting_tokens == 2300
        for h in (b, c):
            pool.prefill_done(h)
        assert pool.views()[0].num_waiting_tokens == 900
        pool.prefill_done(pool.prefill_started("gone", 50))  # unknown worker: harmless
        pool.ledger.check_integrity()
    finally:
        await pool.close()


async def test_views_rebuilt_only_for_what_changed(server: MetricsServer) -> None:
    server.text = GAUGES.format(running=1)
    pool = make_pool()
    try:
        pool.update([make_member(server.port)])
        await pool.scrape_once()
        v1 = pool.views()[0]
        backend = pool.pool("w0")
        await pool.scrape_once()  # same load
        assert pool.views()[0] is v1
        pool.update([make_member(server.port, zone="eu-2")])  # the node's attributes changed
        v2 = pool.views()[0]
        assert v2 is not v1 and v2.attributes == {"zone": "eu-2"}
        assert pool.pool("w0") is backend  # same worker: connections kept
    finally:
        await pool.close()


async def test_cost_calibrated_from_the_histograms(server: MetricsServer) -> None:
    def text(n: int, prefill_s: float, prompt: int, gaps: int, itl_s: float) -> str:
        return GAUGES.format(running=3) + HISTOGRAMS.format(
            n=n, prefill_s=prefill_s, prompt=prompt, gaps=gaps, itl_s=itl_s)

    server.text = text(0, 0.0, 0, 0, 0.0)
    pool = make_pool()
    try:
        pool.update([make_member(server.port)])
        await pool.scrape_once()
        assert dict(pool.views()[0].cost) == {"decode_ms_per_seq": 0.5}
        # 2 prefills of 1000 tokens in 0.208 s: (208 - 2 x 4 fixed ms) / 2000 = 0.1 ms/token;
        # 10 gaps of 20 ms at 3 running: 20 - 0.5 x 3 - 0.015 x ctx/1000 (ctx = 0.25 x 400 x 32)
        server.text = text(2, 0.208, 2000, 10, 0.2)
        await pool.scrape_once()
        cost = pool.views()[0].cost
        assert cost["prefill_ms_per_token"] == pytest.approx(0.1)
        assert cost["decode_base_ms"] == pytest.approx(20 - 1.5 - 0.015 * 3.2)
        assert cost["decode_ms_per_seq"] == 0.5  # configured, not measured
    finally:
        await pool.close()
    off = make_pool(calibrate_cost=False)
    try:
        server.text = text(0, 0.0, 0, 0, 0.0)
        off.update([make_member(server.port)])
        await off.scrape_once()
        server.text = text(2, 0.208, 2000, 10, 0.2)
        await off.scrape_once()
        assert dict(off.views()[0].cost) == {"decode_ms_per_seq": 0.5}
    finally:
        await off.close()


async def test_a_malformed_endpoint_is_skipped_and_the_others_still_join() -> None:
    """One bad entry in the membership never stops it (a gateway replica restarted with it in
    the routing set still starts)."""
    good = caps.Worker("w-good", "http://127.0.0.1:8100", "decode", "tiny")
    bad = caps.Worker("w-bad", "not-a-url", "decode", "tiny")
    later = caps.Worker("w-later", "http://127.0.0.1:8101", "prefill", "tiny")
    pool = WorkerPool(follow_events=False)
    pool.update([caps.Member("n1", good), caps.Member("n2", bad), caps.Member("n1", later)])
    assert sorted(pool.entries) == ["w-good", "w-later"]
    assert "not-a-url" in pool.refused["w-bad"]
    rows = {r["worker_id"]: r for r in pool.routing_state()}  # /debug/workers shows it
    assert rows["w-bad"]["protocol"] == "refused" and "not-a-url" in str(
        rows["w-bad"]["protocol_detail"])
    assert rows["w-good"]["class"] == "public" and rows["w-good"]["healthy"]
    pool.update([caps.Member("n1", good)])
    assert sorted(pool.entries) == ["w-good"] and pool.refused == {}
