"""The gateway's local store of finished requests (issue 13 §2): raw records for `raw_days`,
hourly rollups per (hour, tenant, model) for `rollup_days`, in one SQLite file
(`meshd.coordinator.sqlite`: WAL, `synchronous=NORMAL`, 0600 in a 0700 directory).

`add` is the hot path (the gateway's event loop, once per request): it appends to a bounded
in-memory buffer under a lock and does no I/O; past `max_buffer` the oldest buffered records are
dropped and counted. `flush` (the thread `start` runs, or a caller) writes the buffer in one
transaction: each record's raw row and the hourly rollup it falls into, so a record's counts
survive its raw row and a failed flush leaves nothing behind (its records go back to the buffer
and the next flush writes them once). A request_id already in the file is skipped, not counted
again; one whose raw row retention already deleted is counted again (the file no longer knows
it). A row SQLite refuses (a wrong type, a negative latency) is dropped and counted as rejected.

Reads (`get`, `recent`, `rollups`, `stats`) are synchronous SQLite queries: from async code run
them in a thread. `get` also sees the buffer; `recent` and `rollups` see what has been flushed
(at most one flush interval behind). One process writes a file: the raw row count that bounds
`max_raw_rows` is counted at open and kept in memory.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from meshd.coordinator import sqlite
from meshd.coordinator.gateway.records.record import RequestRecord, RetentionPolicy
from meshd.coordinator.gateway.records.rollup import Rollup
from meshd.coordinator.gateway.records.schema import (
    BAD_ROW,
    HOUR_S,
    INSERT,
    REPLACE_ROLLUP,
    SELECT,
    SELECT_ROLLUP,
    RecordStoreError,
    RollupKey,
    hour_of,
    open_db,
    rollup_from,
    rollup_row,
    row_of,
)

__all__ = ["MAX_RECENT", "RecordStore", "RecordStoreError", "RequestRecord", "RetentionPolicy"]

log = logging.getLogger("meshd.gateway.records")

DAY_S = 86_400.0
MAX_RECENT = 10_000
LOCK_WAIT_S = 30.0  # the longest a flush or retention pass waits for another to finish
DEFAULT_POLICY = RetentionPolicy()


class RecordStore:
    """Request records and their hourly rollups. Thread-safe: `add` takes a buffer lock only;
    writes and reads share one connection under another lock (`sqlite.transaction`)."""

    def __init__(self, path: str | Path, policy: RetentionPolicy = DEFAULT_POLICY,
                 clock: Callable[[], float] = time.time) -> None:
        """Open (creating) the file at `path` (":memory:" for tests); raise `RecordStoreError`
        naming the path when it cannot be."""
        self.path = Path(path).expanduser() if str(path) != ":memory:" else Path(":memory:")
        self.policy = policy
        self.clock = clock
        self._db = open_db(self.path)
        self._lock = threading.Lock()        # the connection
        self._buf_lock = threading.Lock()    # the buffer, `_flushing`, `dropped`
        self._flush_lock = threading.Lock()  # one flush at a time
        self._buf: deque[RequestRecord] = deque(maxlen=policy.max_buffer)
        self._flushing: Iterable[RequestRecord] = ()
        self._raw_rows: int = self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
        self.dropped = 0
        self.rejected = 0
        self.flush_errors = 0
        self.last_flush_at: float | None = None
        self.deleted = {"raw_age": 0, "raw_rows": 0, "rollups": 0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, rec: RequestRecord) -> None:
        """Buffer `rec` for the next flush: O(1), no I/O; the oldest buffered record is dropped
        (and counted in `dropped`) when the buffer is full."""
        with self._buf_lock:
            if len(self._buf) == self.policy.max_buffer:
                self.dropped += 1
            self._buf.append(rec)

    def flush(self) -> int:
        """Write the buffer (one transaction), then apply retention; the number of raw rows
        written (duplicates and rejected rows excluded). On a failure the records go back to the
        buffer and the error is raised."""
        with self._exclusive():
            return self._flush_locked()

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        if not self._flush_lock.acquire(timeout=LOCK_WAIT_S):
            raise TimeoutError(f"gateway records store {self.path}: another flush still runs "
                               f"after {LOCK_WAIT_S} s")
        try:
            yield
        finally:
            self._flush_lock.release()

    def _flush_locked(self) -> int:
        with self._buf_lock:
            batch, self._buf = self._buf, deque(maxlen=self.policy.max_buffer)
            self._flushing = batch
        try:
            written = self._write(batch) if batch else 0
        except BaseException:
            self._requeue(batch)
            raise
        finally:
            with self._buf_lock:
                self._flushing = ()
        self._retain()
        self.last_flush_at = self.clock()
        return written

    def _requeue(self, batch: deque[RequestRecord]) -> None:
        """Put a failed batch back before what was added since, keeping the newest."""
        with self._buf_lock:
            merged = list(batch) + list(self._buf)
            over = max(0, len(merged) - self.policy.max_buffer)
            self.dropped += over
            self._buf = deque(merged[over:], maxlen=self.policy.max_buffer)
            self._flushing = ()

    def _write(self, batch: Iterable[RequestRecord]) -> int:
        aggs: dict[RollupKey, Rollup] = {}
        written = rejected = 0
        with sqlite.transaction(self._lock, self._db) as db:
            for rec in batch:
                try:
                    if db.execute(INSERT, row_of(rec)).rowcount != 1:
                        continue  # a request_id already stored
                except BAD_ROW as e:
                    rejected += 1
                    log.warning("records: dropped request %r: %s", rec.request_id, e)
                    continue
                written += 1
                key = (hour_of(rec.started_at), rec.tenant, rec.model)
                agg = aggs.get(key)
                if agg is None:
                    agg = aggs[key] = Rollup()
                agg.add(rec.outcome == "ok", rec.prompt_tokens, rec.cached_tokens,
                        rec.completion_tokens, rec.ttft_s, rec.e2e_s)
            for key, agg in aggs.items():
                old = db.execute(f"{SELECT_ROLLUP} WHERE hour = ? AND tenant = ? AND model = ?",
                                 key).fetchone()
                if old is not None:
                    agg.merge(rollup_from(old))
                db.execute(REPLACE_ROLLUP, rollup_row(key, agg))
        self._raw_rows += written
        self.rejected += rejected
        return written

    def apply_retention(self) -> dict[str, int]:
        """Delete raw rows started before now - raw_days (their rollups stay), rollups whose
        hour ended by now - rollup_days, and the oldest raw rows past max_raw_rows (`flush`
        does this after each write). The counts deleted: raw_age, raw_rows, rollups."""
        with self._exclusive():
            return self._retain()

    def _retain(self) -> dict[str, int]:
        now = self.clock()
        raw_cut = now - self.policy.raw_days * DAY_S
        rollup_cut = now - self.policy.rollup_days * DAY_S
        with sqlite.transaction(self._lock, self._db) as db:
            aged = db.execute("DELETE FROM records WHERE started_at < ?", (raw_cut,)).rowcount
            over = max(0, self._raw_rows - aged - self.policy.max_raw_rows)
            if over:
                over = db.execute("DELETE FROM records WHERE rowid IN (SELECT rowid FROM records "
                                  "ORDER BY started_at LIMIT ?)", (over,)).rowcount
            rolled = db.execute("DELETE FROM rollups WHERE hour <= ?",
                                (rollup_cut - HOUR_S,)).rowcount
        self._raw_rows -= aged + over
        counts = {"raw_age": aged, "raw_rows": over, "rollups": rolled}
        for k, v in counts.items():
            self.deleted[k] += v
        return counts

    def start(self, interval_s: float = 1.0) -> None:
        """Flush every `interval_s` in a daemon thread until `close`; a failed flush is logged,
        counted (`flush_errors`) and retried at the next tick."""
        if not 0 < interval_s < math.inf:
            raise ValueError(f"gateway.records.flush_interval_s: must be > 0, got {interval_s}")
        if self._thread is not None:
            raise RuntimeError("RecordStore.start: already started")
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True,
                                        name="meshd-records-flush")
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.flush()
            except Exception as e:
                self.flush_errors += 1
                log.warning("records: flush to %s failed (will retry): %s", self.path, e)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the flush thread, flush what is left and close the file, all within about
        `timeout_s`; what could not be written in time is logged as lost. Idempotent."""
        if self._closed:
            return
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if not self._flush_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            log.warning("records: close of %s timed out; %d buffered records lost",
                        self.path, len(self._buf))
            return
        try:
            self._flush_locked()
        except Exception as e:
            log.warning("records: last flush to %s failed; %d records lost: %s",
                        self.path, len(self._buf), e)
        finally:
            self._flush_lock.release()
        with self._lock:
            self._db.close()
        self._closed = True

    def get(self, request_id: str) -> RequestRecord | None:
        """The newest record of `request_id` (a client may reuse an `X-Request-Id`), buffered
        or flushed; None when unknown."""
        with self._buf_lock:
            for rec in reversed([*self._flushing, *self._buf]):
                if rec.request_id == request_id:
                    return rec
        with self._lock:
            row = self._db.execute(f"{SELECT} WHERE request_id = ? ORDER BY started_at DESC "
                                   f"LIMIT 1", (request_id,)).fetchone()
        return None if row is None else RequestRecord(*row)

    def recent(self, limit: int = 100, tenant: str | None = None, model: str | None = None,
               outcome: str | None = None) -> list[RequestRecord]:
        """Flushed records, newest (started_at) first, at most `limit` (capped at MAX_RECENT);
        each filter an exact match."""
        if limit < 0:
            raise ValueError(f"limit: must be >= 0, got {limit}")
        where, args = _filter((("tenant", tenant), ("model", model), ("outcome", outcome)))
        with self._lock:
            rows = self._db.execute(f"{SELECT}{where} ORDER BY started_at DESC, rowid DESC "
                                    "LIMIT ?", (*args, min(limit, MAX_RECENT))).fetchall()
        return [RequestRecord(*r) for r in rows]

    def rollups(self, since: float, until: float, tenant: str | None = None
                ) -> list[dict[str, Any]]:
        """One dict per (hour, tenant, model) whose hour overlaps [since, until), ordered so:
        hour (unix seconds, UTC), tenant, model, then `Rollup.summary()`'s counters and
        latency figures (p50/p95 approximate, see `rollup`)."""
        with self._lock:
            rows = self._db.execute(
                f"{SELECT_ROLLUP} WHERE hour >= ? AND hour < ?"
                + ("" if tenant is None else " AND tenant = ?")
                + " ORDER BY hour, tenant, model",
                (hour_of(since), until) + (() if tenant is None else (tenant,))).fetchall()
        return [{"hour": r[0], "tenant": r[1], "model": r[2], **rollup_from(r).summary()}
                for r in rows]

    def stats(self) -> dict[str, Any]:
        """Counts for monitoring: rows, buffer, drops, file size, last flush, deletions."""
        with self._lock:
            rollup_rows = self._db.execute("SELECT COUNT(*) FROM rollups").fetchone()[0]
        with self._buf_lock:
            buffered = len(self._buf)
        return {"raw_rows": self._raw_rows, "rollup_rows": rollup_rows, "buffered": buffered,
                "dropped": self.dropped, "rejected": self.rejected,
                "flush_errors": self.flush_errors, "file_bytes": self._file_bytes(),
                "last_flush_at": self.last_flush_at, "deleted": dict(self.deleted)}

    def check_integrity(self) -> None:
        """Assert the file's invariants (for tests; a full scan): the raw row count kept in
        memory is the table's; each rollup's histograms sum to its counts; no (hour, tenant,
        model) holds more raw rows than its rollup counted."""
        with self._lock:
            n = self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
            rows = self._db.execute(SELECT_ROLLUP).fetchall()
            raw = {(h, t, m): c for h, t, m, c in self._db.execute(
                f"SELECT CAST(started_at / {HOUR_S} AS INTEGER) * {HOUR_S} AS h, tenant, model, "
                "COUNT(*) FROM records GROUP BY h, tenant, model")}
        assert n == self._raw_rows, (n, self._raw_rows)
        rollups = {(r[0], r[1], r[2]): rollup_from(r) for r in rows}
        for key, r in rollups.items():
            assert r.e2e.count == r.requests >= max(r.errors, r.ttft.count), (key, r)
            for h in (r.ttft, r.e2e):
                assert sum(h.buckets.values()) == h.count, (key, h)
        for key, c in raw.items():
            assert key in rollups and rollups[key].requests >= c, (key, c)

    def _file_bytes(self) -> int:
        if str(self.path) == ":memory:":
            return 0
        files = (self.path, self.path.with_name(self.path.name + "-wal"))
        return sum(p.stat().st_size for p in files if p.exists())


def _filter(pairs: Iterable[tuple[str, str | None]]) -> tuple[str, tuple[str, ...]]:
    clauses = [(f"{col} = ?", v) for col, v in pairs if v is not None]
    return ((" WHERE " + " AND ".join(c for c, _ in clauses)) if clauses else "",
            tuple(v for _, v in clauses))
