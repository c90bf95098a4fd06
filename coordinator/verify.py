"""Envelope verification: authentication (shape, time, signature, nonce) then authorization.

`Verifier.check` either returns who signed (`Verified`) or raises `Rejected` with a reason from
`REASONS`; the gRPC edge maps reasons to status codes and the metrics count them. The nonce cache
and clock are plain state here, with no I/O except the trust store lookups.

Replay protection: a nonce is remembered for twice the timestamp window, so any replay inside
the window is caught; envelopes stamped before this coordinator started are refused as stale,
so a restart (which empties the nonce cache) does not reopen the window.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass

from meshd.coordinator.store import Store, TokenError
from meshd.envelope import NONCE_BYTES, PUBLIC_KEY_BYTES, SIGNATURE_BYTES, signature_ok
from meshd.node_agent.identity import node_id_for
from meshd.proto.v1 import control_pb2 as pb

# reason -> gRPC status code name
REASONS: dict[str, str] = {
    "malformed": "INVALID_ARGUMENT",
    "oversized": "RESOURCE_EXHAUSTED",
    "stale_timestamp": "UNAUTHENTICATED",
    "bad_signature": "UNAUTHENTICATED",
    "replayed_nonce": "UNAUTHENTICATED",
    "unknown_key": "PERMISSION_DENIED",
    "revoked_key": "PERMISSION_DENIED",
    "not_admin": "PERMISSION_DENIED",
    "token_invalid": "PERMISSION_DENIED",
    "token_revoked": "PERMISSION_DENIED",
    "token_used": "PERMISSION_DENIED",
    "token_expired": "PERMISSION_DENIED",
}


class Rejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Verified:
    public_key: bytes
    node_id: str
    role: str
    enrolled: bool = False  # this request consumed a join token


class NonceCache:
    """Nonces seen in the last `ttl_s` seconds; O(1) amortized insert and expiry."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._seen: set[bytes] = set()
        self._order: collections.deque[tuple[float, bytes]] = collections.deque()

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, key: bytes, now: float) -> bool:
        """Record `key`; False when it was already seen (a replay)."""
        while self._order and self._order[0][0] <= now:
            self._seen.discard(self._order.popleft()[1])
        if key in self._seen:
            return False
        self._seen.add(key)
        self._order.append((now + self.ttl_s, key))
        return True


class Verifier:
    def __init__(self, store: Store, window_s: float, clock: Callable[[], float],
                 started_at: float | None = None) -> None:
        self.store = store
        self.window_s = window_s
        self.clock = clock
        self.started_at = clock() if started_at is None else started_at
        self.nonces = NonceCache(2 * window_s)

    def authenticate(self, env: pb.SignedEnvelope, method: str) -> float:
        """Shape, timestamp and signature checks; returns `now`. The nonce is checked by
        `check`, once the key is known to be trusted."""
        if (len(env.signer_public_key) != PUBLIC_KEY_BYTES or len(env.nonce) != NONCE_BYTES
                or len(env.signature) != SIGNATURE_BYTES):
            raise Rejected("malformed", f"envelope needs a {PUBLIC_KEY_BYTES}-byte public key, "
                           f"{NONCE_BYTES}-byte nonce and {SIGNATURE_BYTES}-byte signature")
        now = self.clock()
        ts = env.timestamp_ms / 1000.0
        if abs(now - ts) > self.window_s:
            raise Rejected("stale_timestamp", f"timestamp is {now - ts:+.1f}s from the "
                           f"coordinator's clock; allowed window is ±{self.window_s:g}s")
        if ts < self.started_at - 1e-3:
            raise Rejected("stale_timestamp", "timestamp predates this coordinator's start; "
                           "sign a fresh envelope")
        if not signature_ok(env, method):
            raise Rejected("bad_signature", f"signature does not verify for method {method}")
        return now

    def _fresh(self, env: pb.SignedEnvelope, now: float) -> None:
        """Record the envelope's nonce (only for a key already known to be trusted, so
        envelopes self-signed by unknown keys cannot grow the cache); refuse a replay."""
        if not self.nonces.add(env.signer_public_key + env.nonce, now):
            raise Rejected("replayed_nonce", "nonce was already used by this key")

    def check(self, env: pb.SignedEnvelope, method: str, join_token: str = "",
              admin: bool = False) -> Verified:
        """Authenticate, then authorize: a trusted, unrevoked key, or a valid join token."""
        now = self.authenticate(env, method)
        key = bytes(env.signer_public_key)
        node_id = node_id_for(key)
        rec = self.store.key(key)
        if rec is not None and rec.state == "revoked":
            raise Rejected("revoked_key", f"key of node {node_id} was revoked")
        if rec is None:
            if not join_token:
                raise Rejected("unknown_key", f"key of node {node_id} is not in the trust "
                               "store; run `meshd trust add` or start the agent with a join token")
            # atomic, one use of the token per key: a replayed enrollment finds its key
            # trusted (and its nonce seen), a one-time token's second key finds it used
            try:
                rec = self.store.redeem_token(join_token, key, node_id, now)
            except TokenError as e:
                raise Rejected(f"token_{e.reason}", str(e)) from None
            self._fresh(env, now)
            return Verified(key, node_id, rec.role, enrolled=True)
        self._fresh(env, now)
        if admin and rec.role != "admin":
            raise Rejected("not_admin", f"key of node {node_id} is not an admin key")
        return Verified(key, node_id, rec.role)
