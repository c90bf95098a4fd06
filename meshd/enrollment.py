"""Join tokens, and the proof an agent enrolls with: the token itself never crosses the wire.

A join token is `mjt_<id>.<secret>` (`meshd trust token`); the coordinator stores only
sha256(secret). An agent sends `mjp_<id>.<proof>` instead, in the RegisterRequest its own key
signs:

    proof = base64url(HMAC-SHA256(key = sha256(secret),
                                  msg = b"meshd/v1 enroll\\0" || the agent's public key))

The coordinator recomputes it from the stored hash and the envelope's signer. A captured
request proves possession for that one key, which only its owner can sign for: a token of N
uses cannot be lifted off the (unencrypted) control plane and spent by anyone else. A bare
secret is still accepted for one-time tokens (an agent from before proofs); `Store` refuses it
for a token of more uses. Pure functions, no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import NamedTuple

TOKEN_PREFIX = "mjt_"
PROOF_PREFIX = "mjp_"
DOMAIN = b"meshd/v1 enroll\0"


class Presented(NamedTuple):
    """What a registration carried: a token id and either its bare secret or a proof."""

    token_id: str
    is_proof: bool
    value: str


def secret_hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _mac(stored_hash: bytes, public_key: bytes) -> str:
    digest = hmac.new(stored_hash, DOMAIN + public_key, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def proof(token: str, public_key: bytes) -> str:
    """What an agent holding `token` sends to enroll `public_key`; "" stays "", and anything
    that is not `mjt_<id>.<secret>` is sent as it is (the coordinator refuses it)."""
    token_id, sep, secret = token.removeprefix(TOKEN_PREFIX).partition(".")
    if not token.startswith(TOKEN_PREFIX) or not sep or not secret:
        return token
    return f"{PROOF_PREFIX}{token_id}.{_mac(secret_hash(secret), public_key)}"


def parse(presented: str) -> Presented:
    """Split a presented token or proof (a malformed one gets an id no token has)."""
    is_proof = presented.startswith(PROOF_PREFIX)
    token_id, _, value = presented.removeprefix(
        PROOF_PREFIX if is_proof else TOKEN_PREFIX).partition(".")
    return Presented(token_id, is_proof, value)


def matches(stored_hash: bytes, public_key: bytes, presented: Presented) -> bool:
    """Whether `presented` is the token's secret, or its proof for `public_key`."""
    if presented.is_proof:
        return secrets.compare_digest(_mac(stored_hash, public_key).encode(),
                                      presented.value.encode())
    return secrets.compare_digest(stored_hash, secret_hash(presented.value))
