"""Socket framing shared by the transports: control messages and zero-copy buffer I/O.

Control messages are length-prefixed msgpack maps (4-byte big-endian length, at most
`MAX_FRAME` bytes) with a string key "t" naming the message type. `recv_msg` checks them against
an exact schema: the expected "t", every field present with the expected type, no extra fields.
No pickle anywhere. Every call takes a `Deadline`; failures raise `KVTransferFailure`, which the
transports turn into a `TransferResult` at their API edge.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from meshd.kv_transfer.transport import Deadline, ErrorCode, KVTransferFailure

MAX_FRAME = 1 << 20
_LEN = struct.Struct(">I")
_IOV_BATCH = 512  # well under IOV_MAX (1024 on Linux)

Schema = Mapping[str, type | tuple[type, ...]]


def _fail(code: ErrorCode, message: str) -> KVTransferFailure:
    return KVTransferFailure(code, message)


def send_all(sock: socket.socket, buffers: Sequence[memoryview | bytes], deadline: Deadline) -> int:
    """Send every byte of `buffers` with scatter-gather `sendmsg`, no copies. Returns bytes sent."""
    bufs = [memoryview(b).cast("B") for b in buffers if len(b)]
    total = 0
    while bufs:
        sock.settimeout(deadline.remaining())
        try:
            sent = sock.sendmsg(bufs[:_IOV_BATCH])
        except TimeoutError as exc:
            raise _fail(ErrorCode.TIMEOUT, f"send stalled during {deadline.what}") from exc
        except OSError as exc:
            raise _fail(ErrorCode.TRUNCATED, f"send failed: {exc}") from exc
        total += sent
        while sent:
            head = bufs[0]
            if sent >= len(head):
                sent -= len(head)
                bufs.pop(0)
            else:
                bufs[0] = head[sent:]
                sent = 0
    return total


def recv_into_all(sock: socket.socket, buffers: Sequence[memoryview], deadline: Deadline) -> int:
    """Fill every byte of `buffers` (writable views, e.g. destination tensor slices) straight from
    the socket with `recvmsg_into`. Raises TRUNCATED if the peer closes early."""
    bufs = [b for b in buffers if len(b)]
    total = 0
    while bufs:
        sock.settimeout(deadline.remaining())
        try:
            got = sock.recvmsg_into(bufs[:_IOV_BATCH])[0]
        except TimeoutError as exc:
            raise _fail(ErrorCode.TIMEOUT, f"receive stalled during {deadline.what}") from exc
        except OSError as exc:
            raise _fail(ErrorCode.TRUNCATED, f"receive failed: {exc}") from exc
        if got == 0:
            raise _fail(ErrorCode.TRUNCATED, f"peer closed the stream during {deadline.what}")
        total += got
        while got:
            head = bufs[0]
            if got >= len(head):
                got -= len(head)
                bufs.pop(0)
            else:
                bufs[0] = head[got:]
                got = 0
    return total


def recv_exact(sock: socket.socket, n: int, deadline: Deadline) -> bytes:
    buf = bytearray(n)
    recv_into_all(sock, [memoryview(buf)], deadline)
    return bytes(buf)


def encode_msg(msg: Mapping[str, Any]) -> bytes:
    body: bytes = msgpack.packb(dict(msg), use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ValueError(f"control message of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


def send_msg(sock: socket.socket, msg: Mapping[str, Any], deadline: Deadline) -> None:
    send_all(sock, [encode_msg(msg)], deadline)


def recv_raw_msg(sock: socket.socket, deadline: Deadline) -> dict[str, Any]:
    """Receive one frame and decode it as a msgpack map with a str "t"; no field checks."""
    (length,) = _LEN.unpack(recv_exact(sock, _LEN.size, deadline))
    if length == 0 or length > MAX_FRAME:
        raise _fail(ErrorCode.PROTOCOL, f"control frame length {length} out of range")
    body = recv_exact(sock, length, deadline)
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise _fail(ErrorCode.PROTOCOL, f"undecodable control frame: {exc}") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise _fail(ErrorCode.PROTOCOL, "control frame is not a map with a str 't'")
    return msg


def check_schema(msg: dict[str, Any], kind: str, schema: Schema) -> dict[str, Any]:
    """Validate `msg` as a `kind` message. A peer's "error" message becomes PEER_ERROR, or the
    code it names when that is a known one (auth, layout_mismatch, unknown_request, ...)."""
    if msg["t"] == "error" and kind != "error":
        fields = check_schema(msg, "error", ERROR_SCHEMA)
        code = ErrorCode(fields["code"]) if fields["code"] in set(ErrorCode) else None
        raise _fail(code or ErrorCode.PEER_ERROR, f"peer: {fields['message']}")
    if msg["t"] != kind:
        raise _fail(ErrorCode.PROTOCOL, f"expected a {kind!r} message, got {msg['t']!r}")
    extra = set(msg) - set(schema) - {"t"}
    if extra:
        raise _fail(ErrorCode.PROTOCOL, f"{kind}: unexpected fields {sorted(extra)}")
    for name, typ in schema.items():
        value = msg.get(name)
        if name not in msg or not isinstance(value, typ) or isinstance(value, bool) != (
            typ is bool
        ):
            raise _fail(ErrorCode.PROTOCOL, f"{kind}.{name}: missing or wrong type")
    return msg


def recv_msg(sock: socket.socket, kind: str, schema: Schema, deadline: Deadline) -> dict[str, Any]:
    return check_schema(recv_raw_msg(sock, deadline), kind, schema)


ERROR_SCHEMA: Schema = {"code": str, "message": str}


def send_error(sock: socket.socket, code: ErrorCode, message: str, deadline: Deadline) -> None:
    """Best effort: tell the peer why we are closing. Never raises."""
    with contextlib.suppress(KVTransferFailure, OSError):
        send_msg(sock, {"t": "error", "code": code.value, "message": message}, deadline)


def int_list(value: Any, what: str) -> list[int]:
    """Validate a list of non-negative ints from the wire."""
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise _fail(ErrorCode.PROTOCOL, f"{what}: must be a list of non-negative ints")
    return value
