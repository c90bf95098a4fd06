"""Budgets hold across gateway replicas and restarts: three real gateway runtimes share the
fleet ledger (a real Ray actor persisting to SQLite) while concurrent clients spend one
tenant's daily token budget through them; then a replica restarts, the ledger restarts, and
finally the ledger goes away (fail closed and fail open)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import ray
from support.fake import load_fake_backend
from support.net import free_port

from meshd.config import build
from meshd.coordinator import ledger_actor
from meshd.coordinator.gateway.config import GatewayConfig
from meshd.coordinator.gateway.runtime import GatewayRuntime
from meshd.coordinator.ledger_actor import RayLedgerClient
from meshd.scheduler.admission.ledger import LedgerConfig, SyncRequest

KEY = "sk-acme-0123456789"
LIMIT = 1500  # acme's daily tokens
CHUNKS = 3  # the fake worker's chunks: 3 token ids each, so 9 completion tokens
MAX_TOKENS = 9  # = what it produces: a reservation is exactly the request's use


def make_config(port: int, backend: int, fail_mode: str = "closed",
                ttl_s: float = 5.0) -> GatewayConfig:
    return build(GatewayConfig, {
        "port": port, "static_workers": [f"http://127.0.0.1:{backend}"],
        "api_keys": {"acme": KEY},
        "governance": {"tenants": {"acme": {"daily_tokens": LIMIT}},
                       "ledger": {"sync_interval_s": 0.2, "lease_ttl_s": ttl_s,
                                  "fail_mode": fail_mode, "timeout_s": 1.0}}}, "gateway.")


async def post(http: aiohttp.ClientSession, port: int, prompt: str) -> tuple[int, Any]:
    async with http.post(f"http://127.0.0.1:{port}/v1/completions",
                         json={"model": "fake", "prompt": prompt, "max_tokens": MAX_TOKENS},
                         headers={"authorization": f"Bearer {KEY}"},
                         timeout=aiohttp.ClientTimeout(total=30)) as r:
        return r.status, await r.json()


async def client(http: aiohttp.ClientSession, ports: list[int], i: int,
                 served: list[int], refused: list[dict[str, Any]]) -> None:
    """Spend until three refusals in a row (bounded: at most 60 requests)."""
    misses = 0
    for n in range(60):
        status, body = await post(http, ports[(i + n) % len(ports)], f"client {i} asks {n}")
        if status == 200:
            served.append(body["usage"]["total_tokens"])
            misses = 0
        else:
            refused.append(body["error"] | {"status": status})
            misses += 1
            if misses == 3:
                return


def daily_meter(handle: Any) -> dict[str, Any]:
    rows = ray.get(handle.meters.remote("daily_tokens/acme/"), timeout=10)
    assert len(rows) == 1, rows
    return rows[0]


async def test_a_budget_holds_across_replicas_and_restarts(ray_session: Any,
                                                           state_dir: Path) -> None:
    ns = f"gov-{uuid.uuid4().hex[:8]}"
    handle = ledger_actor.deploy(str(state_dir), LedgerConfig(), ns)
    fake = load_fake_backend().FakeBackend(chunks=CHUNKS)
    backend = await fake.start()
    runtimes = [GatewayRuntime(make_config(free_port(), backend),
                               ledger=RayLedgerClient(handle, 1.0)) for _ in range(3)]
    try:
        for rt in runtimes:
            await rt.start()
        ports = [rt.config.port for rt in runtimes]
        served: list[int] = []
        refused: list[dict[str, Any]] = []
        async with aiohttp.ClientSession() as http:
            await asyncio.gather(*(client(http, ports, i, served, refused) for i in range(12)))
            reservation = max(served)
            # never past the budget: every reservation was an upper bound of its use
            assert sum(served) <= LIMIT
            # and not far below it: what is left is less than a reservation per replica
            assert sum(served) > LIMIT - 3 * reservation - 3 * LIMIT // 10
            assert refused and all(e["code"] == "insufficient_quota" and e["status"] == 429
                                   for e in refused)
            assert "daily_tokens" in refused[0]["message"]
            for rt in runtimes:  # no reservation leaked
                assert rt.governor.outstanding == 0 and rt.governor.book.inflight() == 0
                await rt.governor.keeper.sync()
            assert daily_meter(handle)["committed"] == sum(served)  # exact accounting

            async with http.get(f"http://127.0.0.1:{ports[1]}/v1/meshd/usage",
                                headers={"authorization": f"Bearer {KEY}"}) as r:
                report = await r.json()
            totals = report["totals"]["acme"]
            assert totals["requests"] == len(served)
            assert totals["prompt_tokens"] + totals["completion_tokens"] == sum(served)
            assert totals["refused"] == len(refused)

            # a replica restarts (a new process at the ledger): the budget is still spent
            await runtimes[0].stop(2)
            runtimes[0] = GatewayRuntime(make_config(ports[0], backend),
                                         ledger=RayLedgerClient(handle, 1.0))
            await runtimes[0].start()
            status, body = await post(http, ports[0], "after the restart")
            assert status == 429 and body["error"]["code"] == "insufficient_quota"

            # the ledger restarts (Ray brings it back from its SQLite file): still spent
            pid = ray.get(handle.ready.remote(), timeout=10)["pid"]
            ray.kill(handle, no_restart=False)
            deadline = time.monotonic() + 60
            while True:
                try:
                    if ray.get(handle.ready.remote(), timeout=5)["pid"] != pid:
                        break
                except ray.exceptions.RayError:
                    pass
                assert time.monotonic() < deadline, "the ledger did not come back"
                await asyncio.sleep(0.2)
            assert daily_meter(handle)["committed"] == sum(served)
            for port in ports:
                status, body = await post(http, port, "after the ledger restart")
                assert status == 429 and body["error"]["code"] == "insufficient_quota"
    finally:
        for rt in runtimes:
            await rt.stop(2)
        ledger_actor.stop(ns)
        if fake.server is not None:
            fake.server.close()


async def test_an_unreachable_ledger_fails_closed_or_open(ray_session: Any,
                                                          state_dir: Path) -> None:
    ns = f"gov-{uuid.uuid4().hex[:8]}"
    handle = ledger_actor.deploy(str(state_dir), LedgerConfig(), ns)
    fake = load_fake_backend().FakeBackend(chunks=CHUNKS)
    backend = await fake.start()
    closed = GatewayRuntime(make_config(free_port(), backend, "closed", ttl_s=1.0),
                            ledger=RayLedgerClient(handle, 0.5))
    open_ = GatewayRuntime(make_config(free_port(), backend, "open", ttl_s=1.0),
                           ledger=RayLedgerClient(handle, 0.5))
    try:
        await closed.start()
        await open_.start()
        async with aiohttp.ClientSession() as http:
            for rt in (closed, open_):
                assert (await post(http, rt.config.port, "ledger up"))[0] == 200
            ledger_actor.stop(ns)  # gone for good
            await asyncio.sleep(1.2)  # past the leases' lifetime
            status, body = await post(http, closed.config.port, "ledger down")
            assert status == 503 and body["error"]["code"] == "ledger_unavailable"
            status, body = await post(http, open_.config.port, "ledger down")
            assert status == 200
            assert open_.governor.metrics.fail_open == 1
            assert closed.governor.keeper.failures > 0
    finally:
        for rt in (closed, open_):
            await rt.stop(2)
        ledger_actor.stop(ns)
        if fake.server is not None:
            fake.server.close()


async def test_a_replica_that_dies_mid_request_is_reconciled(ray_session: Any,
                                                             state_dir: Path) -> None:
    """A gateway replica (a Ray actor process) is killed while it streams: its reservation is
    never settled by it, so the ledger expires the replica and charges its lease."""
    from meshd.coordinator.gateway import actor as gateways

    ns = f"gov-{uuid.uuid4().hex[:8]}"
    handle = ledger_actor.deploy(str(state_dir), LedgerConfig(), ns)
    fake = load_fake_backend().FakeBackend(chunks=40)
    backend = await fake.start()
    cfg = dataclasses.replace(make_config(free_port(), backend, ttl_s=2.0), replicas=1)
    # off the loop: the fake worker on this loop must answer the replica's discovery
    (replica,) = await asyncio.to_thread(gateways.deploy, cfg, ns)
    try:
        async with aiohttp.ClientSession() as http:
            body = {"model": "fake", "prompt": "a long answer please", "max_tokens": 120,
                    "stream": True, "fake_delay": 0.1}
            async with http.post(f"http://127.0.0.1:{cfg.port}/v1/completions", json=body,
                                 headers={"authorization": f"Bearer {KEY}"}) as r:
                assert r.status == 200
                await r.content.readline()  # streaming: the reservation is in flight
                await asyncio.sleep(0.5)  # at least one sync has reported it
                ray.kill(replica, no_restart=True)
        probe, epoch = RayLedgerClient(handle, 5.0), 0
        deadline = time.monotonic() + 30
        while ray.get(handle.stats.remote(), timeout=10)["expired_total"] == 0:
            assert time.monotonic() < deadline, "the dead replica was never expired"
            await asyncio.sleep(0.5)
            epoch = (await probe.sync(SyncRequest("probe", epoch, ()))).epoch  # runs expiry
        meter = daily_meter(handle)
        assert meter["outstanding"] == 0  # nothing is left leased to the dead replica
        assert meter["committed"] >= 120  # its reservation was charged, not dropped
        assert ray.get(handle.stats.remote(), timeout=10)["charged_on_expiry"] > 0
    finally:
        gateways.stop(ns)
        ledger_actor.stop(ns)
        if fake.server is not None:
            fake.server.close()
