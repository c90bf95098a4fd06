"""The Responses API's memory: conversations kept for `previous_response_id`.

A response made with `store` (the default) keeps its conversation — the request's input after
the previous response's, and the output — under its id, for the tenant that made it; a request
naming it continues from there (`dialects.responses.continue_conversation`: the new input must
answer the stored response's open tool calls). Each is written as a Responses body
(`responses_body_from_conversation`) and read back through the same validation, so what is
kept is exactly what a client could have sent.

Where: with `[gateway.records] dir` (what `meshd up` sets), one SQLite file there shared by
every replica on the host, so a follow-up (or `GET` / `DELETE /v1/responses/{id}`, which
answer the stored Response object) lands on any replica (written before the response's
last byte goes out, so a client that follows up at once finds it); without one, each replica's
memory (`ResponseStore`) — then a follow-up must reach the same replica. Both bounded: at most
`max_entries` responses, each expiring `ttl_s` after it was stored; the database is pruned on
write. Database calls run in a thread (the event loop never waits on the disk).
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import orjson

from meshd.coordinator.gateway.config import Limits
from meshd.coordinator.gateway.dialects.model import Conversation
from meshd.coordinator.gateway.dialects.responses import (
    ResponsesRequest,
    continue_conversation,
    conversation_after,
    parse_responses_request,
    with_instructions,
)
from meshd.coordinator.gateway.dialects.responses_out import responses_body_from_conversation
from meshd.coordinator.gateway.http.api_request import ApiRequest
from meshd.coordinator.gateway.http.dialect_requests import flat_messages
from meshd.coordinator.gateway.http.errors import ApiError
from meshd.coordinator.gateway.http.openai_api import ChatRequest
from meshd.coordinator.gateway.serving.response_store import ResponseStore

_SCHEMA = """CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, expires REAL NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS responses_expires ON responses (expires);"""


class _Db:
    """The shared file: one connection per replica, used from worker threads under a lock."""

    def __init__(self, path: Path, max_entries: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.max_entries = max_entries
        self.lock = threading.Lock()
        self.conn = sqlite3.connect(str(path), timeout=5.0, check_same_thread=False,
                                    isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.executescript(_SCHEMA)

    def put(self, rid: str, tenant: str, body: bytes, expires: float, now: float) -> None:
        with self.lock:
            c = self.conn
            c.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                      (rid, tenant, expires, body))
            c.execute("DELETE FROM responses WHERE expires <= ?", (now,))
            c.execute("DELETE FROM responses WHERE id IN (SELECT id FROM responses ORDER BY "
                      "expires DESC LIMIT -1 OFFSET ?)", (self.max_entries,))

    def get(self, rid: str, tenant: str, now: float) -> bytes | None:
        with self.lock:
            row = self.conn.execute("SELECT body FROM responses WHERE id = ? AND tenant = ? "
                                    "AND expires > ?", (rid, tenant, now)).fetchone()
        return None if row is None else bytes(row[0])

    def delete(self, rid: str, tenant: str) -> None:
        with self.lock:
            self.conn.execute("DELETE FROM responses WHERE id = ? AND tenant = ?", (rid, tenant))

    def count(self) -> int:
        with self.lock:
            return int(self.conn.execute("SELECT count(*) FROM responses").fetchone()[0])


class ResponsesMemory:
    def __init__(self, path: Path | None = None, max_entries: int = 10_000,
                 ttl_s: float = 30 * 86400.0, max_bytes: int = 256 << 20) -> None:
        self.ttl_s = ttl_s
        self._db = _Db(path, max_entries) if path is not None else None
        self._mem = ResponseStore(max_entries, max_bytes, ttl_s) if path is None else None
        self.stored = self.resolved = self.missed = 0

    async def resolve(self, req: ApiRequest) -> ApiRequest:
        """`req` with the conversation its model reads: the stored one it continues (404 when
        there is none for its tenant), then its input; its instructions first. The dialect
        request keeps the conversation without instructions (what `keep` stores)."""
        r: ResponsesRequest = req.dialect
        conv = r.conversation
        if r.previous_response_id is not None:
            stored = await self._get(r.previous_response_id, req.tenant or "")
            if stored is None:
                self.missed += 1
                raise ApiError(404, f"Previous response with id {r.previous_response_id!r} "
                               f"not found (it was not stored, expired, or belongs to "
                               f"another tenant).", err_type="not_found_error",
                               param="previous_response_id", code="previous_response_not_found")
            self.resolved += 1
            conv = continue_conversation(stored, conv)
        full = with_instructions(conv, r.instructions)
        assert isinstance(req.body, ChatRequest)
        body = dataclasses.replace(req.body, conversation=full, messages=flat_messages(full))
        return dataclasses.replace(req, body=body,
                                   dialect=dataclasses.replace(r, conversation=conv))

    async def keep(self, req: ApiRequest, shape: Any) -> None:
        """Store the response's conversation, when the request asked (`store`)."""
        r: ResponsesRequest = req.dialect
        if not r.store or shape.completion is None:
            return
        conv = conversation_after(r.conversation, shape.completion)
        body = orjson.dumps({"conversation": responses_body_from_conversation(conv),
                             "input": responses_body_from_conversation(r.conversation)["input"],
                             "response": getattr(shape, "final", None)})
        tenant = req.tenant or ""
        self.stored += 1
        if self._db is not None:
            now = time.time()
            await asyncio.to_thread(self._db.put, shape.id, tenant, body, now + self.ttl_s, now)
        else:
            assert self._mem is not None
            self._mem.put(shape.id, body, len(body), tenant=tenant)

    async def _load(self, rid: str, tenant: str) -> dict[str, Any] | None:
        if self._db is not None:
            body = await asyncio.to_thread(self._db.get, rid, tenant, time.time())
        else:
            assert self._mem is not None
            got = self._mem.get(rid, tenant=tenant)
            body = got if isinstance(got, bytes) else None
        return None if body is None else dict(orjson.loads(body))

    async def _get(self, rid: str, tenant: str) -> Conversation | None:
        stored = await self._load(rid, tenant)
        if stored is None:
            return None
        return parse_responses_request({"model": "stored", **stored["conversation"]},
                                       Limits()).conversation

    async def item(self, method: str, rid: str, tenant: str | None, part: str = "",
                   query: str = "") -> dict[str, Any]:
        """GET /v1/responses/{id}: the stored Response; DELETE: forget it; GET
        .../input_items: its input items, a page at a time (`input_items`). 404 when the
        tenant has none by that id (not stored, expired, another tenant's)."""
        who = tenant or ""
        stored = await self._load(rid, who)
        if stored is None or stored.get("response") is None:
            raise ApiError(404, f"Response with id {rid!r} not found.",
                           err_type="not_found_error", code="response_not_found")
        if part == "input_items":
            return input_items(rid, list(stored.get("input") or ()), query)
        if method == "GET":
            return dict(stored["response"])
        if self._db is not None:
            await asyncio.to_thread(self._db.delete, rid, who)
        else:
            assert self._mem is not None
            self._mem.delete(rid, tenant=who)
        return {"id": rid, "object": "response", "deleted": True}

    def describe(self) -> dict[str, Any]:
        where = "sqlite" if self._db is not None else "memory"
        return {"backend": where, "stored": self.stored, "resolved": self.resolved,
                "missed": self.missed, "ttl_s": self.ttl_s}


def input_items(rid: str, items: list[dict[str, Any]], query: str) -> dict[str, Any]:
    """A page of a stored response's input items (everything its model was given: the
    conversation of `previous_response_id` included), as OpenAI lists them: `limit` (1-100,
    default 20), `order` (`desc`, the default, newest first, or `asc`), `after` (an item id:
    the page starts past it). Each item gets an id from its position (`<response id>_in<i>`);
    meshd's own storage hints (`cache_control`) are left out."""
    q = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = sorted(set(q) - {"limit", "order", "after", "include"})
    if unknown:
        raise ApiError(400, f"Unknown query parameter {unknown[0]!r}; input_items takes "
                       f"limit, order, after and include.", param=unknown[0])
    raw_limit = q.get("limit", "20")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
        raise ApiError(400, f"'limit' must be an integer from 1 to 100, got {raw_limit!r}.",
                       param="limit")
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(400, f"'order' must be asc or desc, got {order!r}.", param="order")
    listed = [{"id": f"{rid}_in{i}", **{k: v for k, v in item.items() if k != "cache_control"}}
              for i, item in enumerate(items)]
    if order == "desc":
        listed.reverse()
    after = q.get("after")
    if after:
        at = next((i for i, it in enumerate(listed) if it["id"] == after), None)
        if at is None:
            raise ApiError(400, f"'after' names no input item of {rid!r}: {after!r}.",
                           param="after")
        listed = listed[at + 1:]
    page = listed[:int(raw_limit)]
    return {"object": "list", "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(listed) > len(page)}
