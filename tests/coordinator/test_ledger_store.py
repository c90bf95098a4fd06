"""The ledger's SQLite store: the file mirrors the state after every sync and reloads equal."""

from __future__ import annotations

import random
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from meshd.coordinator.ledger_actor import LocalLedger
from meshd.coordinator.ledger_store import LedgerStore
from meshd.scheduler.admission.ledger import (
    Changes,
    Kind,
    Lease,
    LedgerConfig,
    LedgerState,
    MeterReport,
    Replica,
    SyncRequest,
    UsageDelta,
)

CONFIG = LedgerConfig(ttl_s=10.0, grace_s=60.0, contention_s=2.0)
REQ, TOK, CONC = "acme:req:m", "acme:tok:m", "acme:conc"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_report(key: str, limit: int = 100, kind: Kind = Kind.COUNTER, expires_at: float = 0.0,
                **counts: int) -> MeterReport:
    return MeterReport(key, kind, limit, expires_at, **counts)


def make_ledger(path: Path, clock: FakeClock) -> LocalLedger:
    return LocalLedger(CONFIG, LedgerStore(path), clock)


def make_reloaded(path: Path) -> LedgerState:
    store = LedgerStore(path)
    try:
        return store.load(CONFIG)
    finally:
        store.close()


def assert_same(a: LedgerState, b: LedgerState) -> None:
    a.check_integrity()
    b.check_integrity()
    assert a.meters == b.meters
    assert a.replicas == b.replicas
    assert a.next_epoch == b.next_epoch


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def test_round_trip_restores_meters_epochs_and_leases(tmp_path: Path) -> None:
    path, clock = tmp_path / "state" / "ledger.db", FakeClock()
    ledger = make_ledger(path, clock)
    a = ledger.sync(SyncRequest("a", 0, (make_report(REQ, want=30),
                                         make_report(CONC, 4, Kind.GAUGE, want=3))))
    clock.now += 1
    b = ledger.sync(SyncRequest("b", 0, (make_report(REQ, want=80),)))
    clock.now += 1
    ledger.sync(SyncRequest("a", a.epoch, (
        make_report(REQ, consumed=5, held=20, inflight=5, want=1),
        make_report(CONC, 4, Kind.GAUGE, held=1, inflight=2))))
    ledger.close()
    state = make_reloaded(path)
    assert_same(state, ledger.state)
    assert (a.epoch, b.epoch, state.next_epoch) == (1, 2, 3)
    assert state.used(REQ) == (5, 95, 100)
    assert state.used(CONC) == (0, 3, 4)
    assert state.meters[CONC].kind is Kind.GAUGE
    assert state.meters[REQ].contended_until == 1004.0
    assert state.replicas["a"] == Replica(1, 1002.0, {REQ: Lease(25, 5, 5), CONC: Lease(3, 2)})
    assert state.replicas["b"] == Replica(2, 1001.0, {REQ: Lease(70, 0)})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


USAGE_SYNCS = [
    (UsageDelta("2025-06-01", "acme", "m1", requests=2, prompt_tokens=10, completion_tokens=4,
                spend_nusd=700),
     UsageDelta("2025-06-01", "acme", "m1", requests=1, cached_tokens=3, refused=1)),
    (UsageDelta("2025-06-01", "acme", "m1", requests=1, prompt_tokens=5, spend_nusd=50),
     UsageDelta("2025-06-02", "acme", "m2", requests=4, completion_tokens=9),
     UsageDelta("2025-06-02", "beta", "m1", refused=2)),
]
ROW_A1 = {"day": "2025-06-01", "tenant": "acme", "model": "m1", "requests": 4,
          "prompt_tokens": 15, "cached_tokens": 3, "completion_tokens": 4, "spend_nusd": 750,
          "refused": 1}
ROW_A2 = {"day": "2025-06-02", "tenant": "acme", "model": "m2", "requests": 4,
          "prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 9, "spend_nusd": 0,
          "refused": 0}
ROW_B = {"day": "2025-06-02", "tenant": "beta", "model": "m1", "requests": 0,
         "prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0, "spend_nusd": 0,
         "refused": 2}
USAGE_QUERIES = [
    ({}, [ROW_A1, ROW_A2, ROW_B]),
    ({"tenant": "acme"}, [ROW_A1, ROW_A2]),
    ({"tenant": "beta"}, [ROW_B]),
    ({"since": "2025-06-02"}, [ROW_A2, ROW_B]),
    ({"until": "2025-06-01"}, [ROW_A1]),
    ({"tenant": "acme", "since": "2025-06-01", "until": "2025-06-01"}, [ROW_A1]),
    ({"tenant": "nobody"}, []),
]


@pytest.mark.parametrize("persisted", [True, False])
@pytest.mark.parametrize(("query", "expected"), USAGE_QUERIES)
def test_usage_upserts_add_up(tmp_path: Path, persisted: bool, query: dict[str, str],
                              expected: list[dict[str, Any]]) -> None:
    path = tmp_path / "ledger.db"
    store = LedgerStore(path) if persisted else None
    ledger = LocalLedger(CONFIG, store, FakeClock())
    epoch = 0
    for usage in USAGE_SYNCS:
        epoch = ledger.sync(SyncRequest("a", epoch, (), usage)).epoch
    assert ledger.usage(**query) == expected
    ledger.close()
    if persisted:
        reopened = LedgerStore(path)
        assert reopened.usage(**query) == expected
        reopened.close()


def test_dropped_meters_and_replicas_are_deleted(tmp_path: Path) -> None:
    path, clock = tmp_path / "ledger.db", FakeClock()
    ledger = make_ledger(path, clock)
    window = make_report(TOK, 1000, expires_at=1005.0, want=100)
    epochs = {rid: ledger.sync(SyncRequest(rid, 0, (window, make_report(REQ, want=10)))).epoch
              for rid in ("a", "b", "c")}
    assert len(rows(path, "SELECT * FROM leases")) == 6
    for now in (1009.0, 1018.0, 1027.0, 1036.0, 1045.0, 1054.0, 1063.0):  # b stays silent
        clock.now = now
        for rid in ("a", "c"):
            ledger.sync(SyncRequest(rid, epochs[rid], (make_report(REQ, held=10),)))
    assert rows(path, "SELECT replica FROM replicas ORDER BY replica") == [("a",), ("c",)]
    assert rows(path, "SELECT replica, key FROM leases ORDER BY replica, key") == [
        ("a", REQ), ("a", TOK), ("c", REQ), ("c", TOK)]
    clock.now = 1066.0  # TOK's window ended 61 s ago: forgotten, with c's lease on it too
    ledger.sync(SyncRequest("a", epochs["a"], (make_report(REQ, held=10),)))
    assert rows(path, "SELECT key FROM meters") == [(REQ,)]
    assert rows(path, "SELECT replica, key FROM leases ORDER BY replica") == [
        ("a", REQ), ("c", REQ)]
    assert ledger.stats()["expired_total"] == 1
    assert_same(make_reloaded(path), ledger.state)


def test_expiry_after_a_restart_charges_and_persists(tmp_path: Path) -> None:
    path, clock = tmp_path / "ledger.db", FakeClock()
    ledger = make_ledger(path, clock)
    a = ledger.sync(SyncRequest("a", 0, (make_report(REQ, want=30),
                                         make_report(CONC, 4, Kind.GAUGE, want=2))))
    ledger.sync(SyncRequest("a", a.epoch, (make_report(REQ, consumed=4, held=16, inflight=10),
                                           make_report(CONC, 4, Kind.GAUGE, inflight=2))))
    ledger.close()
    clock.now += 11  # the ledger restarts; a never syncs again
    ledger = make_ledger(path, clock)
    b = ledger.sync(SyncRequest("b", 0, (make_report(REQ),)))
    assert b.epoch == 2 and not b.reset
    assert ledger.state.used(REQ) == (30, 0, 100)  # 4 consumed + 26 outstanding charged
    assert ledger.state.used(CONC) == (0, 0, 4)  # a gauge is released
    assert ledger.stats() == {"replicas": 1, "meters": 2, "expired_total": 1,
                              "charged_on_expiry": 26, "syncs": 1, "save_failures": 0}
    ledger.close()
    state = make_reloaded(path)
    assert_same(state, ledger.state)
    stale = LocalLedger(CONFIG, None, clock)
    stale.state = state
    again = stale.sync(SyncRequest("a", a.epoch, (make_report(REQ, consumed=9),)))
    assert (again.epoch, again.reset) == (3, True)
    assert stale.state.used(REQ) == (30, 0, 100)  # old-epoch use was charged already


def test_the_file_mirrors_the_state_after_every_sync(tmp_path: Path) -> None:
    path, clock = tmp_path / "ledger.db", FakeClock()
    ledger = make_ledger(path, clock)
    reader = LedgerStore(path)
    rng = random.Random(7)
    keys = [("k0", Kind.COUNTER, 0.0), ("k1", Kind.COUNTER, 1030.0), ("k2", Kind.GAUGE, 0.0),
            ("k3", Kind.COUNTER, 1090.0), ("k4", Kind.GAUGE, 1150.0)]
    epochs = {"r0": 0, "r1": 0, "r2": 0}
    for _ in range(120):
        clock.now += rng.choice((0.5, 1.0, 3.0, 12.0))
        rid = rng.choice(sorted(epochs))
        rep = ledger.state.replicas.get(rid)
        reports = []
        for key, kind, expires in rng.sample(keys, rng.randint(1, len(keys))):
            lease = rep.leases.get(key, Lease()) if rep else Lease()
            inflight = rng.randint(0, lease.outstanding)
            used = rng.randint(0, lease.outstanding - inflight) if kind is Kind.COUNTER else 0
            reports.append(make_report(key, 40, kind, expires, consumed=lease.reported + used,
                                       inflight=inflight, held=lease.outstanding - inflight
                                       - used, want=rng.choice((0, 5, 20))))
        usage = (UsageDelta("2025-06-01", rid, "m", requests=1),)
        epochs[rid] = ledger.sync(SyncRequest(rid, epochs[rid], tuple(reports), usage)).epoch
        assert_same(reader.load(CONFIG), ledger.state)
    stats = ledger.stats()
    assert stats["expired_total"] > 0 and stats["charged_on_expiry"] > 0
    assert sum(r["requests"] for r in reader.usage()) == 120
    reader.close()
    ledger.close()


class FlakyStore(LedgerStore):
    def __init__(self, path: Path, failures: int) -> None:
        super().__init__(path)
        self.failures = failures

    def save(self, state: LedgerState, changes: Changes, usage: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("disk I/O error")
        super().save(state, changes, usage)


def test_a_failed_save_is_written_by_the_next(tmp_path: Path) -> None:
    path, clock = tmp_path / "ledger.db", FakeClock()
    ledger = LocalLedger(CONFIG, FlakyStore(path, failures=1), clock)
    a = ledger.sync(SyncRequest("a", 0, (make_report(REQ, want=30),),
                                (UsageDelta("2025-06-01", "acme", "m", requests=1),)))
    assert a.grants[0].delta == 30  # the sync is answered even though its save failed
    assert rows(path, "SELECT * FROM meters") == []
    ledger.sync(SyncRequest("b", 0, (make_report(TOK, want=5),),
                            (UsageDelta("2025-06-01", "acme", "m", requests=2),)))
    assert ledger.stats()["save_failures"] == 1
    assert_same(make_reloaded(path), ledger.state)
    assert [r["requests"] for r in ledger.usage()] == [3]
    ledger.close()


def test_a_sync_of_hundreds_of_meters_saves_in_about_a_millisecond(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path / "ledger.db", FakeClock())
    reports = tuple(make_report(f"t{i}:req", 1000, want=10) for i in range(300))
    epoch = ledger.sync(SyncRequest("a", 0, reports)).epoch
    assert ledger.store is not None
    best = float("inf")
    for _ in range(10):
        ledger.sync(SyncRequest("a", epoch, tuple(make_report(r.key, 1000, consumed=1, held=9)
                                                  for r in reports)))
        t0 = time.perf_counter()
        ledger.store.save(ledger.state, Changes(set(ledger.state.meters), {"a"}), ())
        best = min(best, time.perf_counter() - t0)
    assert best < 0.005, f"best save of 300 meters took {best * 1e3:.2f} ms"
    ledger.close()
