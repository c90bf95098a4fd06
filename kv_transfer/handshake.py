"""Mutual, replay-proof handshake run at the start of every transfer connection.

    client -> server  hello     {v, transport, scheme, id, nonce, layout}
    server -> client  challenge {v, id, nonce, layout, proof}     proof = prove("server", T)
    client -> server  proof     {proof}                           proof = prove("client", T)
    server -> client  ready {}  |  error {code, message}

T is a BLAKE2b hash over the protocol tag, transport, scheme and both sides' identities, fresh
32-byte nonces and canonical layouts, so each proof is bound to this one connection. Both sides
check the peer's proof (and trust in its identity) and layout compatibility before any block
moves. A failure raises `KVTransferFailure` (AUTH, LAYOUT_MISMATCH, PROTOCOL, TIMEOUT); the
server also tells the client why before closing.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Collection
from typing import Any

import msgpack

from meshd.kv_transfer.auth import Authenticator
from meshd.kv_transfer.layout import BlockLayout
from meshd.kv_transfer.transport import Deadline, ErrorCode, KVTransferFailure
from meshd.kv_transfer.wire import recv_msg, send_error, send_msg

PROTOCOL_VERSION = 2  # 2: nccl_stream carries the step size; nccl_join before pair setup
NONCE_BYTES = 32
_TAG = b"meshd-kv-handshake-v1"

HELLO = {"v": int, "transport": str, "scheme": str, "id": bytes, "nonce": bytes, "layout": dict}
CHALLENGE = {"v": int, "id": bytes, "nonce": bytes, "layout": dict, "proof": bytes}
PROOF = {"proof": bytes}


def transcript(
    transport: str,
    scheme: str,
    client: tuple[bytes, bytes, BlockLayout],
    server: tuple[bytes, bytes, BlockLayout],
) -> bytes:
    """Hash binding one handshake: (identity, nonce, layout) of each side."""
    parts: list[Any] = [_TAG, transport, scheme]
    for ident, nonce, layout in (client, server):
        parts += [ident, nonce, layout.to_dict()]
    return hashlib.blake2b(msgpack.packb(parts, use_bin_type=True), digest_size=32).digest()


def _layout(data: dict[str, Any], who: str) -> BlockLayout:
    try:
        return BlockLayout.from_dict(data)
    except ValueError as exc:
        raise KVTransferFailure(ErrorCode.PROTOCOL, f"{who} layout: {exc}") from exc


def _nonce(value: bytes, who: str) -> bytes:
    if len(value) != NONCE_BYTES:
        raise KVTransferFailure(ErrorCode.PROTOCOL, f"{who} nonce must be {NONCE_BYTES} bytes")
    return value


def client_handshake(
    sock: socket.socket,
    auth: Authenticator,
    layout: BlockLayout,
    transport: str,
    deadline: Deadline,
) -> bytes:
    """Authenticate the server and ourselves. Returns the server's identity."""
    my_id, my_nonce = auth.identity(), os.urandom(NONCE_BYTES)
    send_msg(sock, {
        "t": "hello", "v": PROTOCOL_VERSION, "transport": transport, "scheme": auth.scheme,
        "id": my_id, "nonce": my_nonce, "layout": layout.to_dict(),
    }, deadline)
    ch = recv_msg(sock, "challenge", CHALLENGE, deadline)
    peer_layout = _layout(ch["layout"], "server")
    t = transcript(
        transport, auth.scheme,
        (my_id, my_nonce, layout), (ch["id"], _nonce(ch["nonce"], "server"), peer_layout),
    )
    reason = auth.verify(ch["id"], "server", t, ch["proof"])
    if reason is not None:
        send_error(sock, ErrorCode.AUTH, "client rejected server proof", deadline)
        raise KVTransferFailure(ErrorCode.AUTH, f"server: {reason}")
    mismatch = layout.compatible(peer_layout)
    if mismatch is not None:
        send_error(sock, ErrorCode.LAYOUT_MISMATCH, mismatch, deadline)
        raise KVTransferFailure(ErrorCode.LAYOUT_MISMATCH, mismatch)
    send_msg(sock, {"t": "proof", "proof": auth.prove("client", t)}, deadline)
    recv_msg(sock, "ready", {}, deadline)
    return bytes(ch["id"])


def server_handshake(
    sock: socket.socket,
    auth: Authenticator,
    layout: BlockLayout,
    transports: Collection[str],
    deadline: Deadline,
) -> tuple[bytes, str]:
    """Authenticate the client and ourselves; the client's transport must be one of
    `transports` (a server that serves several on one port). Returns (client identity,
    transport)."""
    try:
        hello = recv_msg(sock, "hello", HELLO, deadline)
        if hello["v"] != PROTOCOL_VERSION or hello["transport"] not in transports:
            raise KVTransferFailure(
                ErrorCode.PROTOCOL,
                f"client speaks {hello['transport']} v{hello['v']}, "
                f"server {'|'.join(sorted(transports))} v{PROTOCOL_VERSION}",
            )
        transport = hello["transport"]
        if hello["scheme"] != auth.scheme:
            raise KVTransferFailure(
                ErrorCode.AUTH, f"client auth scheme {hello['scheme']!r} != {auth.scheme!r}"
            )
        peer_layout = _layout(hello["layout"], "client")
        my_id, my_nonce = auth.identity(), os.urandom(NONCE_BYTES)
        t = transcript(
            transport, auth.scheme,
            (hello["id"], _nonce(hello["nonce"], "client"), peer_layout),
            (my_id, my_nonce, layout),
        )
        send_msg(sock, {
            "t": "challenge", "v": PROTOCOL_VERSION, "id": my_id, "nonce": my_nonce,
            "layout": layout.to_dict(), "proof": auth.prove("server", t),
        }, deadline)
        proof = recv_msg(sock, "proof", PROOF, deadline)
        reason = auth.verify(hello["id"], "client", t, proof["proof"])
        if reason is not None:
            raise KVTransferFailure(ErrorCode.AUTH, f"client: {reason}")
        mismatch = layout.compatible(peer_layout)
        if mismatch is not None:
            raise KVTransferFailure(ErrorCode.LAYOUT_MISMATCH, mismatch)
        send_msg(sock, {"t": "ready"}, deadline)
        return bytes(hello["id"]), transport
    except KVTransferFailure as exc:
        if exc.error.code != ErrorCode.TIMEOUT:
            send_error(sock, exc.error.code, exc.error.message, deadline_or_short(deadline))
        raise


def deadline_or_short(deadline: Deadline) -> Deadline:
    """A deadline for a last best-effort message: the caller's, or 1 s if it already passed."""
    try:
        deadline.remaining()
        return deadline
    except KVTransferFailure:
        return Deadline(1.0, "error reply")
