"""ZMQ CURVE for the KV-event ports, keyed by the worker's API token.

A worker's KV events say which prompt blocks it caches; only the mesh's gateways may read them.
meshd's own workers therefore serve their PUB and replay sockets over CURVE (encrypted and
authenticated), with both key pairs derived from the worker's API token (the node's worker
token, which only the node and the gateways hold: `capabilities.Worker.api_token`):

    server secret = SHA-256("meshd-kv-events-v1|server|" + token)   (an X25519 secret key)
    client secret = SHA-256("meshd-kv-events-v1|client|" + token)

The server accepts only the client public key derived from the same token (a ZAP handler in
the publisher's own context), so a subscriber without the token can neither complete the
handshake (it lacks the server's public key) nor pass the check (it lacks the client key).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

_LABEL = b"meshd-kv-events-v1|"


@dataclass(frozen=True, slots=True)
class CurveKeys:
    server_public: bytes  # z85, 40 bytes each
    server_secret: bytes
    client_public: bytes
    client_secret: bytes


def curve_keys(token: str) -> CurveKeys:
    def pair(role: bytes) -> tuple[bytes, bytes]:
        secret = z85.encode(hashlib.sha256(_LABEL + role + b"|" + token.encode()).digest())
        return zmq.curve_public(secret), secret

    sp, ss = pair(b"server")
    cp, cs = pair(b"client")
    return CurveKeys(sp, ss, cp, cs)


def secure_server(sock: zmq.Socket[Any], keys: CurveKeys) -> None:
    """Before bind: serve CURVE with the token's server key."""
    sock.curve_server = True
    sock.curve_secretkey = keys.server_secret
    sock.curve_publickey = keys.server_public


def secure_client(sock: zmq.Socket[Any], keys: CurveKeys) -> None:
    """Before connect: speak CURVE to the token's server key, as the token's client."""
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.client_public
    sock.curve_secretkey = keys.client_secret


class _OnlyClient:
    def __init__(self, key: bytes) -> None:
        self.key = key

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.key


def gate(ctx: zmq.Context[Any], keys: CurveKeys) -> ThreadAuthenticator:
    """Start a ZAP handler in `ctx` (which must be this server's own context) admitting only
    the token's client key; `stop()` it before terminating the context."""
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=_OnlyClient(keys.client_public))
    return auth
