"""The coordinator's durable state: trust store, join tokens and node records, in SQLite.

One file (`<state_dir>/meshd.db`, WAL mode) is shared by the running registry actor and the
operator CLI (`meshd trust ...`), which edits it directly: file-system access to the state dir
is the operator credential. The registry reads keys from the database on every request, so a
key revoked by the CLI is refused from the next request on.

Thread-safe: one connection guarded by a lock. Calls are short; the registry runs writes off its
event loop.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshd import enrollment
from meshd.coordinator import sqlite
from meshd.envelope import PUBLIC_KEY_BYTES

DB_FILE = "meshd.db"
SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    public_key BLOB PRIMARY KEY, node_id TEXT NOT NULL, label TEXT NOT NULL DEFAULT '',
    role TEXT NOT NULL DEFAULT 'agent', state TEXT NOT NULL DEFAULT 'trusted',
    source TEXT NOT NULL DEFAULT 'operator', added_at REAL NOT NULL, revoked_at REAL,
    pinned_host TEXT NOT NULL DEFAULT '',
    pinned_attrs TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS join_tokens (
    token_id TEXT PRIMARY KEY, secret_hash BLOB NOT NULL, label TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL, expires_at REAL NOT NULL, used_at REAL, used_by BLOB,
    max_uses INTEGER NOT NULL DEFAULT 1, uses INTEGER NOT NULL DEFAULT 0, revoked_at REAL
);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY, public_key BLOB NOT NULL, capabilities TEXT NOT NULL,
    registered_at REAL NOT NULL, last_heartbeat REAL NOT NULL, state TEXT NOT NULL
);
"""
# KeyRecord's fields, by name: a store migrated by ALTER TABLE has them in another order
_KEY_COLS = ("public_key, node_id, label, role, state, source, added_at, revoked_at, "
             "pinned_host, pinned_attrs")
_TOKEN_COLS = "token_id, label, created_at, expires_at, used_at, max_uses, uses, revoked_at"
MAX_TOKEN_USES = 10_000


@dataclass(frozen=True, slots=True)
class KeyRecord:
    public_key: bytes
    node_id: str
    label: str
    role: str  # agent | admin
    state: str  # trusted | revoked
    source: str  # operator | token:<id> | local-admin
    added_at: float
    revoked_at: float | None
    pinned_host: str = ""  # the host its workers may listen on besides the one it connects from
    pinned_attrs: str = "{}"  # JSON {key: value}: the guarded attributes its reports may claim

    @property
    def attributes(self) -> dict[str, str]:
        """The attributes the operator pinned for this key (`meshd trust add --attr K=V`)."""
        value = json.loads(self.pinned_attrs or "{}")
        return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A join token as stored (never its secret). `max_uses` 1: one-time; more: an enrollment
    token for that many keys (a worker group whose pods share one spec)."""

    token_id: str
    label: str
    created_at: float
    expires_at: float
    used_at: float | None  # the last enrollment
    max_uses: int
    uses: int
    revoked_at: float | None

    def state(self, now: float) -> str:
        """revoked | used | expired | active, in the order redemption checks them."""
        if self.revoked_at is not None:
            return "revoked"
        if self.uses >= self.max_uses:
            return "used"
        return "expired" if self.expires_at < now else "active"


@dataclass(frozen=True, slots=True)
class NodeRow:
    node_id: str
    public_key: bytes
    capabilities: dict[str, Any]
    registered_at: float
    last_heartbeat: float
    state: str


class TokenError(Exception):
    """A join token was refused; `reason` is one of invalid, revoked, used, expired."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Store:
    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir).expanduser() / DB_FILE
        self._lock = threading.Lock()
        self._db = sqlite.connect(self.path, SCHEMA)
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(keys)")}
        for col, default in (("pinned_host", "''"), ("pinned_attrs", "'{}'")):
            if col not in cols:  # a trust store from before host (attribute) pins
                with contextlib.suppress(sqlite3.OperationalError):  # another process added it
                    self._db.execute(f"ALTER TABLE keys ADD COLUMN {col} TEXT NOT NULL "
                                     f"DEFAULT {default}")
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(join_tokens)")}
        for col, decl in (("max_uses", "INTEGER NOT NULL DEFAULT 1"),
                          ("uses", "INTEGER NOT NULL DEFAULT 0"), ("revoked_at", "REAL")):
            if col not in cols:  # a store from before enrollment tokens: all one-time
                with contextlib.suppress(sqlite3.OperationalError):
                    self._db.execute(f"ALTER TABLE join_tokens ADD COLUMN {col} {decl}")
                if col == "uses":
                    self._db.execute("UPDATE join_tokens SET uses=1 WHERE used_at IS NOT NULL")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return sqlite.transaction(self._lock, self._db)

    # -- keys -------------------------------------------------------------------------------

    def add_key(self, public_key: bytes, node_id: str, label: str = "", role: str = "agent",
                source: str = "operator", pinned_host: str = "",
                pinned_attrs: dict[str, str] | None = None) -> KeyRecord:
        if len(public_key) != PUBLIC_KEY_BYTES:
            raise ValueError(f"public key must be {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
        if role not in ("agent", "admin"):
            raise ValueError(f"role must be 'agent' or 'admin', got {role!r}")
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO keys(public_key, node_id, label, role, state, source, added_at, "
                "pinned_host, pinned_attrs) VALUES (?, ?, ?, ?, 'trusted', ?, ?, ?, ?) "
                "ON CONFLICT(public_key) DO UPDATE SET label=excluded.label, "
                "role=excluded.role, state='trusted', revoked_at=NULL, "
                "pinned_host=excluded.pinned_host, pinned_attrs=excluded.pinned_attrs",
                (public_key, node_id, label, role, source, now, pinned_host,
                 json.dumps(pinned_attrs or {}, sort_keys=True)))
        rec = self.key(public_key)
        assert rec is not None
        return rec

    def revoke_key(self, ident: str) -> KeyRecord:
        """Revoke by node id or hex public key; raises KeyError when nothing matches."""
        rec = self.find_key(ident)
        with self._tx() as db:
            db.execute("UPDATE keys SET state='revoked', revoked_at=? WHERE public_key=?",
                       (time.time(), rec.public_key))
        out = self.key(rec.public_key)
        assert out is not None
        return out

    def find_key(self, ident: str) -> KeyRecord:
        for rec in self.list_keys():
            if ident in (rec.node_id, rec.public_key.hex()):
                return rec
        raise KeyError(f"no key with node id or public key {ident!r}")

    def key(self, public_key: bytes) -> KeyRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_KEY_COLS} FROM keys WHERE public_key=?",
                                   (public_key,)).fetchone()
        return KeyRecord(*row) if row else None

    def list_keys(self) -> list[KeyRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_KEY_COLS} FROM keys ORDER BY added_at").fetchall()
        return [KeyRecord(*r) for r in rows]

    # -- join tokens ------------------------------------------------------------------------

    def create_token(self, ttl_s: float, label: str = "", uses: int = 1) -> str:
        """A token `mjt_<id>.<secret>` that enrolls up to `uses` keys (1: one-time) before it
        expires; only a hash of the secret is stored (`meshd/enrollment.py`)."""
        if not 1 <= uses <= MAX_TOKEN_USES:
            raise ValueError(f"uses must be in 1..{MAX_TOKEN_USES}, got {uses}")
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(24)
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT INTO join_tokens(token_id, secret_hash, label, created_at, "
                       "expires_at, max_uses) VALUES (?, ?, ?, ?, ?, ?)",
                       (token_id, enrollment.secret_hash(secret), label, now, now + ttl_s,
                        uses))
        return f"mjt_{token_id}.{secret}"

    def redeem_token(self, token: str, public_key: bytes, node_id: str, now: float) -> KeyRecord:
        """Count one use of `token` (the agent's proof for `public_key`, or a one-time token's
        bare secret) and trust the key (source `token:<id>`, the record of that use),
        atomically; raises TokenError."""
        presented = enrollment.parse(token)
        with self._tx() as db:
            row = db.execute("SELECT secret_hash, expires_at, max_uses, uses, revoked_at, label "
                             "FROM join_tokens WHERE token_id=?",
                             (presented.token_id,)).fetchone()
            if row is None or not enrollment.matches(row[0], public_key, presented):
                raise TokenError("invalid", "join token is not valid")
            expires_at, max_uses, uses, revoked_at, label = row[1:]
            if max_uses > 1 and not presented.is_proof:
                raise TokenError("invalid", "a join token of several uses is accepted only as "
                                 "the agent's proof for its key, never bare (update the agent)")
            token_id = presented.token_id
            if revoked_at is not None:
                raise TokenError("revoked", "join token was revoked")
            if uses >= max_uses:
                raise TokenError("used", "join token was already used" if max_uses == 1 else
                                 f"join token was already used {uses} times, its limit")
            if expires_at < now:
                raise TokenError("expired", "join token expired")
            db.execute("UPDATE join_tokens SET uses=uses+1, used_at=?, used_by=? "
                       "WHERE token_id=?", (now, public_key, token_id))
            db.execute(
                "INSERT INTO keys(public_key, node_id, label, role, state, source, added_at) "
                "VALUES (?, ?, ?, 'agent', 'trusted', ?, ?)",
                (public_key, node_id, label, f"token:{token_id}", now))
        rec = self.key(public_key)
        assert rec is not None
        return rec

    def revoke_token(self, token_id: str, now: float | None = None) -> TokenRecord:
        """Refuse every later enrollment with the token (by id, or the whole token); raises
        KeyError when there is none. Keys it already enrolled stay trusted: `enrolled_by`."""
        token_id = enrollment.parse(token_id).token_id
        with self._tx() as db:
            cur = db.execute("UPDATE join_tokens SET revoked_at=COALESCE(revoked_at, ?) "
                             "WHERE token_id=?", (time.time() if now is None else now, token_id))
            if cur.rowcount == 0:
                raise KeyError(f"no join token with id {token_id!r}")
        return next(t for t in self.tokens() if t.token_id == token_id)

    def enrolled_by(self, token_id: str) -> list[KeyRecord]:
        """The keys `token_id` enrolled, one per use, in enrollment order."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_KEY_COLS} FROM keys WHERE source=? "
                                    "ORDER BY added_at", (f"token:{token_id}",)).fetchall()
        return [KeyRecord(*r) for r in rows]

    def tokens(self) -> list[TokenRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_TOKEN_COLS} FROM join_tokens "
                                    "ORDER BY created_at").fetchall()
        return [TokenRecord(*r) for r in rows]

    # -- nodes ------------------------------------------------------------------------------

    def upsert_node(self, row: NodeRow) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO nodes VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(node_id) DO UPDATE SET "
                "public_key=excluded.public_key, capabilities=excluded.capabilities, "
                "registered_at=excluded.registered_at, last_heartbeat=excluded.last_heartbeat, "
                "state=excluded.state",
                (row.node_id, row.public_key, json.dumps(row.capabilities), row.registered_at,
                 row.last_heartbeat, row.state))

    def update_liveness(self, rows: list[tuple[str, float, str]]) -> None:
        """Batch-update (node_id, last_heartbeat, state)."""
        if not rows:
            return
        with self._tx() as db:
            db.executemany("UPDATE nodes SET last_heartbeat=?, state=? WHERE node_id=?",
                           [(hb, st, nid) for nid, hb, st in rows])

    def nodes(self) -> list[NodeRow]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM nodes ORDER BY node_id").fetchall()
        return [NodeRow(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5]) for r in rows]

