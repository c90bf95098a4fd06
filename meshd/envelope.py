"""Signed envelopes: how every control-plane request is wrapped (see proto/v1/control.proto).

The signed bytes are domain-separated and bound to the RPC method, so an envelope signed for one
method can never be replayed as another:
    b"meshd/v1\\0" + method + b"\\0" + timestamp_ms (8 bytes, big-endian) + nonce + payload
"""

from __future__ import annotations

import os
import struct
import time
from typing import Protocol

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from meshd.proto.v1 import control_pb2 as pb

SERVICE = "meshd.v1.Control"  # gRPC service name
REASON_KEY = "meshd-reject-reason"  # trailing metadata naming why a request was refused
DOMAIN = b"meshd/v1\0"
NONCE_BYTES = 16
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class Signer(Protocol):
    @property
    def public_key(self) -> bytes: ...

    def sign(self, message: bytes) -> bytes: ...


def signed_bytes(method: str, timestamp_ms: int, nonce: bytes, payload: bytes) -> bytes:
    return b"".join((DOMAIN, method.encode(), b"\0", struct.pack(">q", timestamp_ms), nonce,
                     payload))


def seal(signer: Signer, method: str, payload: bytes, *, timestamp_ms: int | None = None,
         nonce: bytes | None = None) -> pb.SignedEnvelope:
    """Wrap `payload` for `method`, signed by `signer`, with a fresh nonce and the current time."""
    ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    n = os.urandom(NONCE_BYTES) if nonce is None else nonce
    sig = signer.sign(signed_bytes(method, ts, n, payload))
    return pb.SignedEnvelope(payload=payload, signer_public_key=signer.public_key,
                             timestamp_ms=ts, nonce=n, signature=sig)


def signature_ok(env: pb.SignedEnvelope, method: str) -> bool:
    """True when the envelope's signature is valid for `method` under its own public key."""
    try:
        VerifyKey(env.signer_public_key).verify(
            signed_bytes(method, env.timestamp_ms, env.nonce, env.payload), env.signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True
