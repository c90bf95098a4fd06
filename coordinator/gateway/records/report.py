"""`GET /debug/requests`: a replica's request records and hourly rollups, as JSON.

    /debug/requests                              the newest 100 records
    /debug/requests?request_id=ID                one record (null when this replica has none)
    /debug/requests?tenant=T&model=M&outcome=O&limit=N
    /debug/requests?rollups=1&since=UNIX&until=UNIX[&tenant=T]   hourly rollups (default: 24 h)

Each replica keeps its own file (the shared port reaches one of them); the answer says which.
Blocking SQLite reads: call it in a thread.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from meshd.coordinator.gateway.http.errors import ApiError
from meshd.coordinator.gateway.records.store import RecordStore

DAY_S = 86_400.0
KNOWN = ("request_id", "tenant", "model", "outcome", "limit", "rollups", "since", "until")


def _number(query: dict[str, str], name: str, default: float) -> float:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ApiError(400, f"Query parameter {name!r} must be a number, got {raw[:40]!r}.",
                       param=name, code="invalid_query") from None


def records_report(store: RecordStore, query: dict[str, str]) -> dict[str, Any]:
    unknown = next((k[:40] for k in query if k not in KNOWN), None)
    if unknown is not None:  # a misspelt filter would otherwise answer unfiltered records
        raise ApiError(400, f"Unknown query parameter {unknown!r}; known: {', '.join(KNOWN)}.",
                       param=unknown, code="invalid_query")
    out: dict[str, Any] = {"object": "meshd.requests", "store": str(store.path),
                           "stats": store.stats()}
    if query.get("request_id"):
        rec = store.get(query["request_id"])
        out["record"] = None if rec is None else dataclasses.asdict(rec)
        return out
    if query.get("rollups") in ("1", "true"):
        until = _number(query, "until", time.time())
        since = _number(query, "since", until - DAY_S)
        out["rollups"] = store.rollups(since, until, query.get("tenant") or None)
        return out
    limit = int(_number(query, "limit", 100))
    if limit < 0:
        raise ApiError(400, "Query parameter 'limit' must be >= 0.", param="limit",
                       code="invalid_query")
    out["records"] = [dataclasses.asdict(r) for r in store.recent(
        limit, query.get("tenant") or None, query.get("model") or None,
        query.get("outcome") or None)]
    return out
