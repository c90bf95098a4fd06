"""Cache-routing health in a live gateway replica: real KV event publishers posing as workers
(ZMQ on loopback), a real `/metrics` scrape, the HTTP report and the Prometheus gauges."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from support.mesh import engines
from support.net import free_port

from meshd.capabilities import Member, Worker
from meshd.coordinator.gateway.config import GatewayConfig, RoutingConfig
from meshd.coordinator.gateway.http.server import GatewayServer
from meshd.coordinator.gateway.runtime import GatewayRuntime, make_router
from meshd.coordinator.gateway.serving.mesh import MeshHandler
from meshd.coordinator.gateway.serving.prompts import PromptBuilder
from meshd.coordinator.gateway.serving.request_metrics import MeshMetrics
from meshd.coordinator.gateway.workers.cache_monitor import CacheHealthMonitor
from meshd.coordinator.gateway.workers.pool import WorkerPool
from meshd.node_agent.engine.kv_publisher import BlockStored, KVEventPublisher
from meshd.scheduler.block_hash import block_hashes, to_int64
from meshd.scheduler.cache_health import CacheHealthConfig
from meshd.scheduler.prefix_index import PrefixIndex

FAST = CacheHealthConfig(silence_window_s=0.6, rehash_every=1, silence_needs_activity=True)


class FakeWorker:
    """A KV event publisher plus a `/metrics` endpoint whose prefix-cache queries grow by one
    uncached block's worth of tokens per scrape (a worker doing prefill work)."""

    def __init__(self, wid: str, block_size: int = 16) -> None:
        self.pub = KVEventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
        self.queries = 0
        self.port = free_port()
        self.worker = Worker(wid, f"http://127.0.0.1:{self.port}", "both", "m",
                             engine="vllm", kv_block_size=block_size,
                             kv_events_endpoint=self.pub.endpoint,
                             kv_events_replay_endpoint=self.pub.replay_endpoint or "")
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await r.readline() not in (b"\r\n", b""):
            pass
        self.queries += 64
        body = (f"vllm:prefix_cache_queries_total {self.queries}\n"
                "vllm:prefix_cache_hits_total 0\n").encode()
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        await w.drain()
        w.close()

    def publish_prompt(self, seed: str, block_size: int, n_blocks: int = 3) -> int:
        """Publish one BlockStored of a first `n_blocks` blocks; returns the last hash."""
        tokens = list(range(n_blocks * block_size))
        hashes = [to_int64(h) for h in block_hashes(tokens, block_size, seed)]
        self.pub.publish([BlockStored(hashes, None, tokens, block_size)])
        return hashes[-1]

    async def close(self) -> None:
        self.pub.close()
        if self.server:
            self.server.close()


@asynccontextmanager
async def make_gateway(workers: Sequence[Worker]
                       ) -> AsyncIterator[tuple[str, CacheHealthMonitor]]:
    health = CacheHealthMonitor("0", FAST)
    index = PrefixIndex()
    pool = WorkerPool(index, RoutingConfig(scrape_interval_s=0.05), health=health)
    pool.update(Member("n-test", w) for w in workers)
    metrics = MeshMetrics()
    metrics.watch_health(health)
    handler = MeshHandler(pool, make_router(RoutingConfig(), index), PromptBuilder(),
                          metrics=metrics)
    handler.on_runs = health.observe_runs
    server = GatewayServer(GatewayConfig(port=free_port()), handler, registry=metrics.registry,
                           cache_health=health.to_json)
    await pool.start()
    await server.start()
    try:
        yield f"http://127.0.0.1:{server.config.port}", health
    finally:
        await server.shutdown(2)
        await pool.close()


async def get(url: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200
        return await (r.json() if "json" in r.content_type else r.text())


async def until_seen(url: str, fw: FakeWorker, publish: Any) -> dict[str, Any]:
    """Publish until the gateway has applied a batch (ZMQ subscriptions join late)."""
    for _ in range(100):
        publish()
        await asyncio.sleep(0.05)
        rep = await get(url + "/debug/cache-health")
        row = next(w for w in rep["workers"] if w["worker_id"] == fw.worker.worker_id)
        if row["batches_seen"] and row["rehash_checked"] + (row["block_size_seen"] != 16):
            return row
    raise AssertionError("no KV event batch reached the gateway")


@asynccontextmanager
async def fake_workers(*specs: tuple[str, int]) -> AsyncIterator[list[FakeWorker]]:
    fws = [FakeWorker(wid, bs) for wid, bs in specs]
    for fw in fws:
        await fw.start()
    try:
        yield fws
    finally:
        for fw in fws:
            await fw.close()


async def test_correct_events_are_healthy() -> None:
    async with fake_workers(("good", 16)) as [fw], make_gateway([fw.worker]) as (url, health):
        last = 0

        def publish() -> None:
            nonlocal last
            last = fw.publish_prompt("0", 16)

        before = await until_seen(url, fw, publish)
        # a continuation chained on a published parent is re-hashed through the digest memo
        tokens = list(range(48)) + list(range(100, 116))
        chained = [to_int64(h) for h in block_hashes(tokens, 16, "0")][-1]
        fw.pub.publish([BlockStored([chained], last, tokens[48:], 16)])
        for _ in range(50):
            row = (await get(url + "/debug/cache-health"))["workers"][0]
            if row["batches_seen"] > before["batches_seen"]:
                break
            await asyncio.sleep(0.05)
        assert row["rehash_checked"] == before["rehash_checked"] + 1
        rep = await get(url + "/debug/cache-health")
        assert rep["ok"] is True and rep["issues"] == {}
        row = rep["workers"][0]
        assert row["issues"] == [] and row["rehash_mismatched"] == 0
        assert row["rehash_checked"] >= 2 and row["block_size_seen"] == 16
        assert row["last_event_age_s"] is not None and row["kv_events"] is True
        text = await get(url + "/metrics")
        assert "meshd_cache_health_ok 1.0" in text
        assert 'meshd_cache_health_event_age_seconds{worker="good"}' in text
        health.checker.check_integrity()


async def test_other_seed_is_a_hash_mismatch() -> None:
    async with fake_workers(("seed", 16)) as [fw], make_gateway([fw.worker]) as (url, _):
        row = await until_seen(url, fw, lambda: fw.publish_prompt("12345", 16))
        assert row["issues"] == ["hash_mismatch"] and row["rehash_mismatched"] >= 1
        text = await get(url + "/metrics")
        assert 'meshd_cache_health_issues{issue="hash_mismatch",worker="seed"} 1.0' in text
        assert "meshd_cache_health_ok 0.0" in text


async def test_wrong_block_size_is_reported() -> None:
    async with fake_workers(("size", 16)) as [fw], make_gateway([fw.worker]) as (url, _):
        row = await until_seen(url, fw, lambda: fw.publish_prompt("0", 32))
        assert row["issues"] == ["block_size_mismatch"]
        assert (row["block_size_expected"], row["block_size_seen"]) == (16, 32)


async def test_busy_worker_without_events_turns_silent() -> None:
    async with fake_workers(("quiet", 16), ("talky", 16)) as [quiet, talky], \
            make_gateway([quiet.worker, talky.worker]) as (url, _):
        await until_seen(url, talky, lambda: talky.publish_prompt("0", 16))
        rep = await get(url + "/debug/cache-health")
        assert rep["ok"] is True  # not yet past the window: no verdict
        for _ in range(60):  # talky keeps publishing; quiet serves traffic and publishes nothing
            talky.publish_prompt("0", 16)
            await asyncio.sleep(0.05)
        rep = await get(url + "/debug/cache-health")
        rows = {w["worker_id"]: w for w in rep["workers"]}
        assert rows["quiet"]["issues"] == ["silent"] and rows["quiet"]["batches_seen"] == 0
        assert rows["quiet"]["last_event_age_s"] is None
        assert rows["talky"]["issues"] == []
        assert rep["issues"] == {"silent": 1}


async def test_embedded_engine_through_the_gateway_stays_healthy(tmp_path: Path) -> None:
    # token ids in the events (off by default: hashes only) let the gateway re-hash blocks
    with engines([("w0", "both")], tmp_path, extra=["--kv-events-token-ids"]) as [e0]:
        async def members() -> list[Member]:
            return [Member("n-test", e0.worker)]

        rt = GatewayRuntime(GatewayConfig(port=free_port(),
                                          routing=RoutingConfig(scrape_interval_s=0.1),
                                          membership_interval_s=60), members)
        await rt.start()
        url = f"http://127.0.0.1:{rt.config.port}"
        try:
            prompt = "The quick brown fox jumps over the lazy dog. " * 6
            async with aiohttp.ClientSession() as s:
                for i in range(3):
                    body = {"model": "meshd-tiny", "prompt": prompt + str(i), "max_tokens": 4}
                    async with s.post(url + "/v1/completions", json=body) as r:
                        assert r.status == 200, await r.text()
            rep: dict[str, Any] = {}
            for _ in range(100):
                rep = await get(url + "/debug/cache-health")
                if rep["workers"] and rep["workers"][0]["rehash_checked"]:
                    break
                await asyncio.sleep(0.05)
            row = rep["workers"][0]
            assert rep["ok"] is True, rep
            assert row["worker_id"] == "w0" and row["batches_seen"] >= 1
            assert row["rehash_checked"] >= 1 and row["rehash_mismatched"] == 0
            assert row["block_size_seen"] == 16
            assert "meshd_cache_health_ok 1.0" in await get(url + "/metrics")
        finally:
            await rt.stop(2)
