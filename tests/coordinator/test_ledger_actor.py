"""The ledger in process and as a Ray actor: reads, clients, one limit shared by concurrent
replicas, a restart that keeps committed units and epochs, and a stopped ledger's error."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import ray

from meshd.coordinator import ledger_actor
from meshd.coordinator.ledger_actor import (
    InProcessLedgerClient,
    LedgerClient,
    LedgerUnavailable,
    LocalLedger,
    RayLedgerClient,
)
from meshd.scheduler.admission.ledger import (
    Kind,
    LedgerConfig,
    MeterReport,
    SyncReply,
    SyncRequest,
    UsageDelta,
)

CONFIG = LedgerConfig(ttl_s=120.0)  # nothing expires while a restarted actor comes back


def make_report(key: str, limit: int, kind: Kind = Kind.COUNTER, **counts: int) -> MeterReport:
    return MeterReport(key, kind, limit, 0.0, **counts)


def test_meters_and_stats_read_the_state() -> None:
    ledger = LocalLedger(CONFIG, None, clock=lambda: 1000.0)
    a = ledger.sync(SyncRequest("a", 0, (make_report("acme:req", 10, want=4),
                                         make_report("acme:conc", 3, Kind.GAUGE, want=1))))
    ledger.sync(SyncRequest("b", 0, (make_report("beta:req", 5, want=9),)))
    ledger.sync(SyncRequest("a", a.epoch, (make_report("acme:req", 10, consumed=3, held=1),)))
    assert ledger.meters("acme:") == [
        {"key": "acme:conc", "kind": "gauge", "limit": 3, "committed": 0, "outstanding": 1,
         "free": 2},
        {"key": "acme:req", "kind": "counter", "limit": 10, "committed": 3, "outstanding": 1,
         "free": 6}]
    assert [m["key"] for m in ledger.meters()] == ["acme:conc", "acme:req", "beta:req"]
    assert ledger.meters("beta:")[0]["free"] == 0
    assert ledger.stats() == {"replicas": 2, "meters": 3, "expired_total": 0,
                              "charged_on_expiry": 0, "syncs": 3, "save_failures": 0}
    ledger.close()


async def test_in_process_client_is_a_ledger_client() -> None:
    client: LedgerClient = InProcessLedgerClient(LocalLedger(CONFIG, None, lambda: 1000.0))
    usage = (UsageDelta("2025-06-01", "acme", "m", requests=1, spend_nusd=40),)
    reply = await client.sync(SyncRequest("a", 0, (make_report("acme:req", 10, want=4),), usage))
    assert (reply.epoch, reply.reset, reply.grants[0].delta, reply.grants[0].free) == (
        1, False, 4, 6)
    assert [m["outstanding"] for m in await client.meters("acme")] == [4]
    rows = await client.usage(tenant="acme")
    assert [(r["requests"], r["spend_nusd"]) for r in rows] == [(1, 40)]


class FakeMethod:
    def __init__(self, result: Any) -> None:
        self.result = result

    def remote(self, *args: Any) -> Any:
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


class FakeHandle:
    def __init__(self, result: Any) -> None:
        self.sync = self.usage = self.meters = FakeMethod(result)


async def make_never() -> None:
    await asyncio.Event().wait()


async def make_dead() -> None:
    raise ray.exceptions.RayActorError()


@pytest.mark.parametrize(("make_result", "message"), [
    (make_never, "ledger sync: no answer within 0.05s"),
    (make_dead, "ledger sync: RayActorError"),
    (lambda: ray.exceptions.ActorUnavailableError("gone", b"\0" * 16),
     "ledger sync: ActorUnavailableError"),
])
async def test_ray_client_raises_unavailable(make_result: Any, message: str) -> None:
    client = RayLedgerClient(FakeHandle(make_result()), timeout_s=0.05)
    with pytest.raises(LedgerUnavailable, match=message):
        await client.sync(SyncRequest("a", 0, ()))


async def ready_after_restart(handle: Any, old_pid: int, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            info = await asyncio.wait_for(handle.ready.remote(), 10)
            if info["pid"] != old_pid:
                return info
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("ledger actor did not come back")
        await asyncio.sleep(0.2)


async def run_replica(client: RayLedgerClient, rid: str, key: str, limit: int,
                      rounds: int) -> tuple[int, int, int]:
    """Sync `rounds` times, consuming one unit and wanting 7 more each time; returns
    (epoch, consumed, held)."""
    epoch, consumed, held = 0, 0, 0
    for _ in range(rounds):
        used = min(held, 1)
        reply: SyncReply = await client.sync(SyncRequest(
            rid, epoch, (make_report(key, limit, consumed=consumed + used, held=held - used,
                                     want=7),)))  # consumption is cumulative
        assert not reply.reset and reply.grants[0].delta >= 0
        epoch, consumed, held = reply.epoch, consumed + used, held - used + reply.grants[0].delta
        assert consumed + held <= limit
    return epoch, consumed, held


async def test_replicas_share_one_limit_and_a_restart_keeps_it(
        ray_session: Any, state_dir: Path) -> None:
    ns, key, limit = f"ledger-{uuid.uuid4().hex[:8]}", "acme:tok", 50
    handle = ledger_actor.deploy(str(state_dir), CONFIG, namespace=ns)
    try:
        assert ledger_actor.find(ns) is not None
        clients = [RayLedgerClient(handle, 10.0), RayLedgerClient(ledger_actor.find(ns), 10.0)]
        results = await asyncio.gather(*(run_replica(c, f"r{i}", key, limit, 12)
                                         for i, c in enumerate(clients)))
        assert sorted(r[0] for r in results) == [1, 2]
        consumed, held = sum(r[1] for r in results), sum(r[2] for r in results)
        assert consumed + held == limit  # all of it granted, never more
        before = await clients[0].meters()
        assert before == [{"key": key, "kind": "counter", "limit": limit, "committed": consumed,
                           "outstanding": held, "free": 0}]

        pid = (await handle.ready.remote())["pid"]
        ray.kill(handle, no_restart=False)
        info = await ready_after_restart(handle, pid)
        assert info["path"] == str(state_dir / "ledger.db")
        assert await clients[1].meters() == before
        epoch, _, h = results[0]
        again = await clients[0].sync(SyncRequest("r0", epoch, (make_report(key, limit, held=h),)))
        assert (again.epoch, again.reset) == (epoch, False)
        fresh = await clients[1].sync(SyncRequest("r9", 0, (make_report(key, limit),)))
        assert fresh.epoch == 3
    finally:
        assert ledger_actor.stop(ns)


async def test_a_stopped_ledger_is_unavailable_within_the_timeout(
        ray_session: Any, state_dir: Path) -> None:
    ns = f"ledger-{uuid.uuid4().hex[:8]}"
    handle = ledger_actor.deploy(str(state_dir), CONFIG, namespace=ns)
    try:
        client = RayLedgerClient(handle, timeout_s=3.0)
        assert (await client.sync(SyncRequest("a", 0, ()))).epoch == 1
        with pytest.raises(ValueError, match="already persists to"):
            ledger_actor.deploy(str(state_dir / "elsewhere"), CONFIG, namespace=ns)
    finally:
        assert ledger_actor.stop(ns)
    assert ledger_actor.find(ns) is None and not ledger_actor.stop(ns)
    t0 = time.monotonic()
    with pytest.raises(LedgerUnavailable, match="ledger sync"):
        await client.sync(SyncRequest("a", 1, ()))
    assert time.monotonic() - t0 < 3.5
