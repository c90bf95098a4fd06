"""The records file's tables and the conversions between their rows and `RequestRecord` /
`Rollup`. `records` holds one STRICT row per request (a row of the wrong type, a negative or
absurd time, is refused by SQLite); `rollups` one row per (hour, tenant, model) with counters and
the two latency histograms (`rollup.Histogram.encode`)."""

from __future__ import annotations

import math
import operator
import sqlite3
from dataclasses import fields
from pathlib import Path
from typing import Any

from meshd.coordinator import sqlite
from meshd.coordinator.gateway.records.record import RequestRecord
from meshd.coordinator.gateway.records.rollup import Histogram, Rollup

HOUR_S = 3600


class RecordStoreError(OSError):
    """The store's file cannot be opened or created; the message names the path."""


FIELDS = tuple(f.name for f in fields(RequestRecord))
_TEXT = {"request_id", "trace_id", "tenant", "model", "endpoint", "outcome", "mode",
         "prefill_workers", "decode_workers", "nodes"}
_REAL = {"started_at": "NOT NULL CHECK (started_at BETWEEN 0 AND 1e11)",
         "ttft_s": "CHECK (ttft_s BETWEEN 0 AND 1e9)",
         "e2e_s": "NOT NULL CHECK (e2e_s BETWEEN 0 AND 1e9)"}


def _column(name: str) -> str:
    if name in _REAL:
        return f"{name} REAL {_REAL[name]}"
    return f"{name} {'TEXT' if name in _TEXT else 'INTEGER'} NOT NULL"


ROLLUP_COUNTERS = ("requests", "errors", "prompt_tokens", "cached_tokens", "completion_tokens")
ROLLUP_COLUMNS = ("hour", "tenant", "model", *ROLLUP_COUNTERS,
                  "ttft_count", "ttft_sum", "ttft_max", "ttft_hist",
                  "e2e_count", "e2e_sum", "e2e_max", "e2e_hist")
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS records (
    {', '.join(_column(n) for n in FIELDS)}, UNIQUE (request_id, started_at)
) STRICT;
CREATE INDEX IF NOT EXISTS records_by_time ON records(started_at);
CREATE INDEX IF NOT EXISTS records_by_tenant ON records(tenant, started_at);
CREATE TABLE IF NOT EXISTS rollups (
    hour INTEGER NOT NULL, tenant TEXT NOT NULL, model TEXT NOT NULL,
    {', '.join(f'{c} INTEGER NOT NULL' for c in ROLLUP_COUNTERS)},
    ttft_count INTEGER NOT NULL, ttft_sum REAL NOT NULL, ttft_max REAL NOT NULL,
    ttft_hist TEXT NOT NULL,
    e2e_count INTEGER NOT NULL, e2e_sum REAL NOT NULL, e2e_max REAL NOT NULL,
    e2e_hist TEXT NOT NULL,
    PRIMARY KEY (hour, tenant, model)
) STRICT, WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rollups_by_tenant ON rollups(tenant, hour);
"""
INSERT = (f"INSERT INTO records ({', '.join(FIELDS)}) VALUES ({', '.join('?' * len(FIELDS))}) "
          "ON CONFLICT(request_id, started_at) DO NOTHING")
SELECT = f"SELECT {', '.join(FIELDS)} FROM records"
REPLACE_ROLLUP = f"INSERT OR REPLACE INTO rollups VALUES ({', '.join('?' * 16)})"
SELECT_ROLLUP = f"SELECT {', '.join(ROLLUP_COLUMNS)} FROM rollups"
BAD_ROW = (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError)
row_of = operator.attrgetter(*FIELDS)
RollupKey = tuple[int, str, str]  # (hour, tenant, model)


def hour_of(t: float) -> int:
    """The UTC hour a unix time falls in, as the unix seconds it starts at."""
    return math.floor(t / HOUR_S) * HOUR_S


def open_db(path: Path) -> sqlite3.Connection:
    """The records file at `path` (created with its directory), schema applied; ":memory:" is
    a private in-memory database. `RecordStoreError` naming the path when it cannot be."""
    if str(path) == ":memory:":
        db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        db.executescript(SCHEMA)
        return db
    if path.exists() and not path.is_file():
        raise RecordStoreError(f"gateway records store {path}: exists and is not a file")
    try:
        return sqlite.connect(path, SCHEMA)
    except (OSError, sqlite3.Error) as e:
        raise RecordStoreError(f"gateway records store {path}: cannot open: {e}") from e


def rollup_row(key: RollupKey, r: Rollup) -> tuple[Any, ...]:
    return (*key, r.requests, r.errors, r.prompt_tokens, r.cached_tokens, r.completion_tokens,
            r.ttft.count, r.ttft.total, r.ttft.max, r.ttft.encode(),
            r.e2e.count, r.e2e.total, r.e2e.max, r.e2e.encode())


def rollup_from(row: tuple[Any, ...]) -> Rollup:
    requests, errors, prompt, cached, completion = row[3:8]
    return Rollup(requests, errors, prompt, cached, completion,
                  Histogram.decode(*row[8:12]), Histogram.decode(*row[12:16]))
