"""The fleet ledger's durable state in SQLite, so budgets and leases survive a ledger restart.

One file (`<state_dir>/ledger.db`, WAL, `synchronous=NORMAL`: a commit is not fsynced, so an
OS crash may lose the last syncs, a process crash loses nothing) written only by the ledger
actor. `save` writes, in one transaction, exactly the rows one `LedgerState.sync` touched (its
`changes()`), so a sync costs a few hundred row writes, not a rewrite of the ledger; after every
successful `save` the file holds exactly the state's meters, replicas, leases and next epoch,
and `load` rebuilds an equal state through `LedgerState.restore`.

The usage table is the per-day report (`GET /v1/meshd/usage`): one row per (day, tenant,
model) whose counters each `save` adds to.

Thread-safe: one connection guarded by a lock.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from meshd.coordinator import sqlite
from meshd.scheduler.admission.ledger import (
    Changes,
    Kind,
    Lease,
    LedgerConfig,
    LedgerState,
    Meter,
    Replica,
    UsageDelta,
)

LEDGER_DB = "ledger.db"
USAGE_KEYS = ("day", "tenant", "model")
USAGE_COUNTERS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens",
                  "spend_nusd", "refused")
SCHEMA = """
CREATE TABLE IF NOT EXISTS meters (
    key TEXT PRIMARY KEY, kind INTEGER NOT NULL, lim INTEGER NOT NULL, expires_at REAL NOT NULL,
    committed INTEGER NOT NULL, contended_until REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (
    replica TEXT NOT NULL, key TEXT NOT NULL, outstanding INTEGER NOT NULL,
    inflight INTEGER NOT NULL, reported INTEGER NOT NULL, PRIMARY KEY (replica, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS leases_by_key ON leases(key);
CREATE TABLE IF NOT EXISTS replicas (
    replica TEXT PRIMARY KEY, epoch INTEGER NOT NULL, last_seen REAL NOT NULL,
    ttl_s REAL NOT NULL, usage_seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    id INTEGER PRIMARY KEY CHECK (id = 0), next_epoch INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL, tenant TEXT NOT NULL, model TEXT NOT NULL,
    requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, spend_nusd INTEGER NOT NULL, refused INTEGER NOT NULL,
    PRIMARY KEY (day, tenant, model)
) WITHOUT ROWID;
"""
_UPSERT_METER = (
    "INSERT INTO meters VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
    "kind=excluded.kind, lim=excluded.lim, expires_at=excluded.expires_at, "
    "committed=excluded.committed, contended_until=excluded.contended_until")
_UPSERT_REPLICA = (
    "INSERT INTO replicas VALUES (?, ?, ?, ?, ?) ON CONFLICT(replica) DO UPDATE SET "
    "epoch=excluded.epoch, last_seen=excluded.last_seen, ttl_s=excluded.ttl_s, "
    "usage_seq=excluded.usage_seq")
_UPSERT_USAGE = (
    f"INSERT INTO usage VALUES ({', '.join('?' * 9)}) ON CONFLICT(day, tenant, model) "
    "DO UPDATE SET " + ", ".join(f"{c}={c}+excluded.{c}" for c in USAGE_COUNTERS))


def usage_row(u: UsageDelta) -> tuple[str | int, ...]:
    """A delta as (day, tenant, model, *counters), the usage table's column order."""
    return (u.day, u.tenant, u.model, u.requests, u.prompt_tokens, u.cached_tokens,
            u.completion_tokens, u.spend_nusd, u.refused)


class LedgerStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        self._db = sqlite.connect(self.path, SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return sqlite.transaction(self._lock, self._db)

    def load(self, config: LedgerConfig) -> LedgerState:
        """The persisted ledger (an empty one for a new file); its `changes()` start empty."""
        with self._lock:
            meters = [Meter(key, Kind(kind), lim, expires_at, committed, 0, contended_until)
                      for key, kind, lim, expires_at, committed, contended_until
                      in self._db.execute("SELECT * FROM meters")]
            replicas = {rid: Replica(epoch, last_seen, {}, ttl_s, usage_seq)
                        for rid, epoch, last_seen, ttl_s, usage_seq
                        in self._db.execute("SELECT * FROM replicas")}
            for rid, key, outstanding, inflight, reported in self._db.execute(
                    "SELECT * FROM leases"):
                if rid in replicas:
                    replicas[rid].leases[key] = Lease(outstanding, inflight, reported)
            row = self._db.execute("SELECT next_epoch FROM meta WHERE id = 0").fetchone()
        return LedgerState.restore(config, meters, replicas.items(), row[0] if row else 1)

    def save(self, state: LedgerState, changes: Changes, usage: Sequence[UsageDelta]) -> None:
        """Write what `changes` names, as `state` now has it, and add `usage`, atomically.

        Deletions come first; a meter or replica named in an upsert set but absent from
        `state` is deleted too, so the union of several `Changes` (a save that failed, then
        the next) is saved correctly. A dropped meter's leases go with it, whichever replica
        held them."""
        meters: list[tuple[Any, ...]] = []
        gone_meters = set(changes.dropped_meters)
        for key in changes.meters:
            m = state.meters.get(key)
            if m is None:
                gone_meters.add(key)
            else:
                meters.append((key, int(m.kind), m.limit, m.expires_at, m.committed,
                               m.contended_until))
        replicas: list[tuple[str, int, float, float, int]] = []
        leases: list[tuple[str, str, int, int, int]] = []
        gone_replicas = set(changes.dropped_replicas)
        for rid in changes.replicas:
            rep = state.replicas.get(rid)
            if rep is None:
                gone_replicas.add(rid)
                continue
            replicas.append((rid, rep.epoch, rep.last_seen, rep.ttl_s, rep.usage_seq))
            leases.extend((rid, key, ls.outstanding, ls.inflight, ls.reported)
                          for key, ls in rep.leases.items())
        with self._tx() as db:
            for rid in gone_replicas | {r[0] for r in replicas}:
                db.execute("DELETE FROM leases WHERE replica = ?", (rid,))
            db.executemany("DELETE FROM replicas WHERE replica = ?",
                           [(rid,) for rid in gone_replicas])
            for key in gone_meters:
                db.execute("DELETE FROM leases WHERE key = ?", (key,))
                db.execute("DELETE FROM meters WHERE key = ?", (key,))
            db.executemany(_UPSERT_METER, meters)
            db.executemany(_UPSERT_REPLICA, replicas)
            db.executemany("INSERT INTO leases VALUES (?, ?, ?, ?, ?)", leases)
            db.executemany(_UPSERT_USAGE, [usage_row(u) for u in usage])
            db.execute("INSERT INTO meta VALUES (0, ?) ON CONFLICT(id) DO UPDATE SET "
                       "next_epoch = excluded.next_epoch", (state.next_epoch,))

    def usage(self, tenant: str | None = None, since: str | None = None,
              until: str | None = None) -> list[dict[str, Any]]:
        """Rows per (day, tenant, model), ordered so; `since`/`until` are inclusive UTC days
        (YYYY-MM-DD), `tenant` an exact match."""
        where, args = _usage_filter(tenant, since, until)
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM usage{where} ORDER BY day, tenant, model", args).fetchall()
        return [dict(zip(USAGE_KEYS + USAGE_COUNTERS, r, strict=True)) for r in rows]


def _usage_filter(tenant: str | None, since: str | None, until: str | None
                 ) -> tuple[str, tuple[str, ...]]:
    clauses, args = [], []
    for clause, value in (("tenant = ?", tenant), ("day >= ?", since), ("day <= ?", until)):
        if value is not None:
            clauses.append(clause)
            args.append(value)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(args)
