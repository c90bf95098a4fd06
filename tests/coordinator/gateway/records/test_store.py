"""The gateway's request record store: round trips, hourly rollups, retention on a simulated
clock, duplicates and failed flushes counted once, the bounded buffer, persistence, the flush
thread, and clear errors for a bad path or policy."""

from __future__ import annotations

import dataclasses
import math
import random
import sqlite3
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from meshd.coordinator.gateway.records import store as store_mod
from meshd.coordinator.gateway.records.rollup import REL_ERROR
from meshd.coordinator.gateway.records.store import (
    RecordStore,
    RecordStoreError,
    RequestRecord,
    RetentionPolicy,
)

T0 = 1_800_000_000.0  # an hour boundary (2027-01-15T08:00Z)
DAY = 86_400.0
COUNTERS = ("requests", "errors", "prompt_tokens", "cached_tokens", "completion_tokens",
            "ttft_count", "e2e_count")


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_record(n: int = 0, **kw: Any) -> RequestRecord:
    base: dict[str, Any] = dict(
        request_id=f"req-{n}", trace_id=f"{n:032x}", started_at=T0 + n, tenant="acme",
        model="m1", endpoint="chat", outcome="ok", status=200, mode="disaggregated",
        prompt_tokens=100, cached_tokens=40, completion_tokens=20, ttft_s=0.05, e2e_s=0.5,
        prefill_workers="p0", decode_workers="d0,d1", nodes="n0,n1", retries=1, choices=1)
    return RequestRecord(**(base | kw))


def make_store(path: str | Path = ":memory:", clock: Clock | None = None,
               **policy: Any) -> RecordStore:
    return RecordStore(path, RetentionPolicy(**policy), clock or Clock(T0 + 60))


def counters(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(r["hour"], r["tenant"], r["model"], *(r[k] for k in COUNTERS)) for r in rows]


def test_round_trip_get_and_recent() -> None:
    s = make_store()
    recs = [make_record(0), make_record(1, tenant="beta", outcome="error", status=502,
                                        ttft_s=None),
            make_record(2, model="m2"), make_record(3, outcome="timeout", status=504)]
    for r in recs:
        s.add(r)
    assert s.flush() == 4
    got = s.get("req-1")
    assert got == recs[1] and got is not None and got.ttft_s is None
    assert s.get("nope") is None
    assert s.recent() == recs[::-1]
    assert s.recent(limit=2) == [recs[3], recs[2]]
    assert s.recent(limit=0) == []
    assert s.recent(tenant="beta") == [recs[1]]
    assert s.recent(model="m2") == [recs[2]]
    assert s.recent(outcome="timeout", tenant="acme") == [recs[3]]
    assert s.recent(tenant="acme", model="m1") == [recs[3], recs[0]]
    with pytest.raises(ValueError, match="limit"):
        s.recent(limit=-1)
    s.check_integrity()


def test_recent_limit_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "MAX_RECENT", 3)
    s = make_store()
    for n in range(5):
        s.add(make_record(n))
    s.flush()
    assert [r.request_id for r in s.recent(limit=100)] == ["req-4", "req-3", "req-2"]


def test_get_sees_the_buffer_recent_does_not() -> None:
    s = make_store()
    s.add(make_record(0))
    assert s.get("req-0") == make_record(0)
    assert s.recent() == []
    assert s.stats()["buffered"] == 1


def test_rollups_per_hour_tenant_model() -> None:
    s = make_store()
    h0, h1 = T0, T0 + 3600
    rows = [  # (started_at, tenant, model, outcome, prompt, cached, completion, ttft)
        (h0 + 10, "acme", "m1", "ok", 100, 50, 10, 0.1),
        (h0 + 3599, "acme", "m1", "error", 7, 0, 0, None),
        (h0 + 20, "acme", "m2", "ok", 30, 0, 3, 0.2),
        (h0 + 30, "", "m1", "refused", 5, 0, 0, None),
        (h1, "acme", "m1", "ok", 1, 1, 1, 0.3),
        (h1 + 5, "acme", "m1", "cancelled", 2, 0, 4, 0.4),
    ]
    for n, (t, tenant, model, outcome, p, c, o, ttft) in enumerate(rows):
        s.add(make_record(n, started_at=t, tenant=tenant, model=model, outcome=outcome,
                          prompt_tokens=p, cached_tokens=c, completion_tokens=o, ttft_s=ttft))
    s.flush()
    assert counters(s.rollups(h0, h1 + 3600)) == [
        (h0, "", "m1", 1, 1, 5, 0, 0, 0, 1),
        (h0, "acme", "m1", 2, 1, 107, 50, 10, 1, 2),
        (h0, "acme", "m2", 1, 0, 30, 0, 3, 1, 1),
        (h1, "acme", "m1", 2, 1, 3, 1, 5, 2, 2),
    ]
    assert [r["hour"] for r in s.rollups(h0 + 1800, h1)] == [h0] * 3  # hours overlapping
    assert [r["hour"] for r in s.rollups(h1 + 1, h1 + 2)] == [h1]
    assert [r["model"] for r in s.rollups(h0, h1 + 1, tenant="")] == ["m1"]
    one = s.rollups(h1, h1 + 1)[0]
    assert one["ttft_max_s"] == 0.4 and one["ttft_sum_s"] == pytest.approx(0.7)
    assert one["e2e_sum_s"] == pytest.approx(1.0) and one["e2e_max_s"] == 0.5
    s.check_integrity()


def nearest_rank(xs: list[float], q: float) -> float:
    return sorted(xs)[max(1, math.ceil(q * len(xs))) - 1]


def test_rollup_quantiles_within_the_documented_error() -> None:
    rng = random.Random(11)
    e2e = [rng.lognormvariate(math.log(2.0), 0.8) for _ in range(3000)]
    ttft = [rng.lognormvariate(math.log(0.08), 0.6) for _ in range(3000)]
    s = make_store()
    for n, (e, t) in enumerate(zip(e2e, ttft, strict=True)):
        s.add(make_record(n, started_at=T0 + n % 3600, e2e_s=e, ttft_s=t))
        if n == 1000:
            s.flush()  # two flushes into the same hour: the second merges into the stored row
    s.flush()
    (row,) = s.rollups(T0, T0 + 3600)
    assert row["requests"] == 3000
    for name, xs in (("e2e", e2e), ("ttft", ttft)):
        for q, key in ((0.5, f"{name}_p50_s"), (0.95, f"{name}_p95_s")):
            exact = nearest_rank(xs, q)
            assert abs(row[key] / exact - 1) <= REL_ERROR, (key, row[key], exact)
        assert row[f"{name}_max_s"] == max(xs)
        assert row[f"{name}_sum_s"] == pytest.approx(sum(xs))


def test_retention_by_age_keeps_rollups_then_drops_them() -> None:
    clock = Clock(T0 + 60)
    s = make_store(clock=clock, raw_days=7, rollup_days=90)
    for n in range(10):
        s.add(make_record(n, started_at=T0 + n * 600, outcome="ok" if n % 3 else "error"))
    s.flush()
    before = s.rollups(T0, T0 + DAY)
    assert sum(r["requests"] for r in before) == 10

    clock.t = T0 + 7 * DAY + 3 * 600 + 1  # past raw_days for records 0..3
    assert s.apply_retention() == {"raw_age": 4, "raw_rows": 0, "rollups": 0}
    assert len(s.recent()) == 6 and s.get("req-0") is None
    clock.t = T0 + 8 * DAY
    assert s.apply_retention()["raw_age"] == 6
    assert s.recent() == [] and s.stats()["raw_rows"] == 0
    assert s.rollups(T0, T0 + DAY) == before  # same totals and latencies without raw rows
    s.check_integrity()

    clock.t = T0 + 90 * DAY + 3600  # the first hour has ended 90 days ago; the second not yet
    assert s.apply_retention()["rollups"] == 1
    assert s.rollups(T0, T0 + DAY) == before[1:]
    clock.t = T0 + 91 * DAY
    s.apply_retention()
    assert s.rollups(T0, T0 + DAY) == []
    st = s.stats()
    assert st["rollup_rows"] == 0
    assert st["deleted"] == {"raw_age": 10, "raw_rows": 0, "rollups": len(before)}


def test_max_raw_rows_keeps_the_newest_rollups_unaffected() -> None:
    s = make_store(max_raw_rows=5)
    for n in range(12):
        s.add(make_record(n, started_at=T0 + 11 - n))  # added newest first
    s.flush()
    assert [r.started_at for r in s.recent()] == [T0 + k for k in (11, 10, 9, 8, 7)]
    assert sum(r["requests"] for r in s.rollups(T0, T0 + 3600)) == 12
    st = s.stats()
    assert st["raw_rows"] == 5 and st["deleted"]["raw_rows"] == 7
    s.add(make_record(100, started_at=T0 + 20))
    s.flush()
    assert s.recent()[-1].started_at == T0 + 8 and s.stats()["raw_rows"] == 5
    s.check_integrity()


def test_a_duplicate_request_id_is_counted_once() -> None:
    s = make_store()
    s.add(make_record(0))
    s.add(make_record(0))  # the same batch
    assert s.flush() == 1
    s.add(make_record(0, outcome="error"))  # a later flush
    assert s.flush() == 0
    (row,) = s.rollups(T0, T0 + 3600)
    assert (row["requests"], row["errors"], row["prompt_tokens"]) == (1, 0, 100)
    assert s.get("req-0") == make_record(0)
    s.check_integrity()


def test_a_reused_request_id_keeps_both_requests() -> None:
    """A client may send the same X-Request-Id twice: two requests (two start times), both
    kept and counted; a record sent twice (the same start) is still one."""
    s = make_store()
    first = make_record(0)
    again = dataclasses.replace(first, started_at=first.started_at + 5, outcome="error")
    s.add(first)
    s.add(again)
    s.add(again)
    assert s.flush() == 2
    (row,) = s.rollups(T0, T0 + 3600)
    assert (row["requests"], row["errors"]) == (2, 1)
    assert s.get("req-0") == again  # the newest
    s.check_integrity()


class FailingDB:
    """The store's connection, failing the next rollup write (a full disk, say)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db, self.fail = db, True

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if self.fail and sql.startswith("INSERT OR REPLACE INTO rollups"):
            self.fail = False
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def test_a_failed_flush_is_retried_and_counted_once(monkeypatch: pytest.MonkeyPatch) -> None:
    s = make_store()
    monkeypatch.setattr(s, "_db", FailingDB(s._db))
    s.add(make_record(0))
    s.add(make_record(1))
    with pytest.raises(sqlite3.OperationalError):
        s.flush()
    assert s.recent() == [] and s.rollups(T0, T0 + 3600) == []  # rolled back
    assert s.stats()["buffered"] == 2 and s.get("req-0") == make_record(0)
    s.add(make_record(2))
    assert s.flush() == 3
    (row,) = s.rollups(T0, T0 + 3600)
    assert row["requests"] == 3
    assert [r.request_id for r in s.recent()] == ["req-2", "req-1", "req-0"]
    s.check_integrity()


def test_rows_sqlite_refuses_are_dropped_and_counted() -> None:
    s = make_store()
    s.add(make_record(0, e2e_s=-1.0))
    s.add(make_record(1, tenant=None))
    s.add(make_record(2, prompt_tokens=[1]))
    s.add(make_record(3, ttft_s=math.inf))
    s.add(make_record(4))
    assert s.flush() == 1
    assert [r.request_id for r in s.recent()] == ["req-4"]
    assert s.stats()["rejected"] == 4 and s.rollups(T0, T0 + 3600)[0]["requests"] == 1


def test_max_buffer_drops_the_oldest_and_counts_them() -> None:
    s = make_store(max_buffer=3)
    for n in range(5):
        s.add(make_record(n))
    st = s.stats()
    assert (st["buffered"], st["dropped"]) == (3, 2)
    s.flush()
    assert [r.request_id for r in s.recent()] == ["req-4", "req-3", "req-2"]
    assert s.stats()["dropped"] == 2


def test_persistence_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state" / "records.db"
    s = make_store(path)
    for n in range(3):
        s.add(make_record(n))
    s.flush()
    s.add(make_record(3))  # flushed by close
    rollups = s.rollups(T0, T0 + 3600)
    s.close()
    s.close()  # idempotent
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = make_store(path)
    assert again.get("req-1") == make_record(1)
    assert [r.request_id for r in again.recent()] == ["req-3", "req-2", "req-1", "req-0"]
    assert again.rollups(T0, T0 + 3600)[0]["requests"] == rollups[0]["requests"] + 1
    st = again.stats()
    assert st["raw_rows"] == 4 and st["file_bytes"] > 0 and st["last_flush_at"] is None
    again.check_integrity()
    again.close()


def test_flush_thread_writes_what_other_threads_add(tmp_path: Path) -> None:
    path = tmp_path / "records.db"
    s = make_store(path)
    s.start(interval_s=0.01)
    with pytest.raises(RuntimeError, match="already started"):
        s.start()

    def produce(base: int) -> None:
        for n in range(base, base + 200):
            s.add(make_record(n))

    producers = [threading.Thread(target=produce, args=(k * 1000,)) for k in range(2)]
    for t in producers:
        t.start()
    for t in producers:
        t.join(5.0)
    deadline = time.monotonic() + 5.0
    while s.stats()["last_flush_at"] is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert s.stats()["last_flush_at"] == T0 + 60  # the thread flushed, on the store's clock
    s.add(make_record(5000))  # left for close
    s.close(timeout_s=5.0)
    assert s._thread is not None and not s._thread.is_alive()
    again = make_store(path)
    assert again.stats()["raw_rows"] == 401
    assert again.get("req-5000") is not None
    assert sum(r["requests"] for r in again.rollups(T0, T0 + 2 * DAY)) == 401
    again.check_integrity()
    again.close()


def test_a_bad_path_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    for bad in (tmp_path / "dir.db", tmp_path / "file" / "records.db", tmp_path / "junk.db"):
        with pytest.raises(RecordStoreError, match=str(bad)):
            RecordStore(bad)
    assert stat.S_IMODE((tmp_path / "dir.db").stat().st_mode) != 0o600  # left alone


@pytest.mark.parametrize(("field", "value"), [
    ("raw_days", 0), ("raw_days", -1.0), ("raw_days", math.nan), ("raw_days", "7"),
    ("rollup_days", math.inf), ("rollup_days", 3.0),  # below raw_days
    ("max_raw_rows", 0), ("max_raw_rows", 1.5), ("max_buffer", 0), ("max_buffer", True),
])
def test_a_bad_policy_names_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"gateway\.records\.{field}:"):
        dataclasses.replace(RetentionPolicy(), **{field: value})


def test_start_rejects_a_bad_interval() -> None:
    with pytest.raises(ValueError, match="interval"):
        make_store().start(interval_s=0)
