"""Connection plumbing shared by socket-controlled transports: a threaded listener and connect.

The listener accepts on a background thread and runs each connection's handler on its own daemon
thread, so a synchronous engine loop is never blocked by a transfer. Handlers get a connected
socket and own it; the listener closes it after the handler returns.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from meshd.kv_transfer.auth import Authenticator
from meshd.kv_transfer.handshake import client_handshake, server_handshake
from meshd.kv_transfer.memory import BlockMemory
from meshd.kv_transfer.transport import (
    BlockSource,
    Deadline,
    ErrorCode,
    KVTransferFailure,
    Peer,
    TransferError,
    TransferResult,
)
from meshd.kv_transfer.wire import int_list, recv_msg, send_error

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ServerStats:
    """Counters a server keeps; read them through `snapshot()`."""

    connections: int = 0
    served: int = 0  # requests whose blocks the peer confirmed
    bytes_sent: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # by ErrorCode value
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, *, connections: int = 0, served: int = 0, bytes_sent: int = 0) -> None:
        with self._lock:
            self.connections += connections
            self.served += served
            self.bytes_sent += bytes_sent

    def fail(self, code: ErrorCode) -> None:
        with self._lock:
            self.failures[code.value] = self.failures.get(code.value, 0) + 1

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {
                "connections": self.connections, "served": self.served,
                "bytes_sent": self.bytes_sent, "failures": dict(self.failures),
            }


class Listener:
    """Accepts TCP connections on `host:port` (0 picks a free port) and hands each to `handle`."""

    def __init__(self, host: str, port: int, handle: Callable[[socket.socket], None]) -> None:
        self._handle = handle
        self._sock = socket.create_server((host, port), backlog=64)
        self._sock.settimeout(0.2)
        self._closed = threading.Event()
        bound = self._sock.getsockname()
        self.address = Peer(bound[0], bound[1])
        self._thread = threading.Thread(target=self._accept_loop, name="kv-listener", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closed.is_set():
                    return
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(
                target=self._run, args=(conn,), name="kv-conn", daemon=True
            ).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self._handle(conn)
        except Exception:  # a handler bug must not kill the server
            log.exception("kv transfer connection handler failed")
        finally:
            conn.close()

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        self._thread.join(timeout=2.0)


def connect(peer: Peer, deadline: Deadline) -> socket.socket:
    """Connect to `peer` before `deadline`; CONNECT or TIMEOUT failure otherwise."""
    try:
        sock = socket.create_connection((peer.host, peer.port), timeout=deadline.remaining())
    except TimeoutError as exc:
        raise KVTransferFailure(ErrorCode.TIMEOUT, f"connect to {peer} timed out") from exc
    except OSError as exc:
        raise KVTransferFailure(ErrorCode.CONNECT, f"connect to {peer}: {exc}") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


FETCH = {"request_id": str, "block_ids": list, "chunk_bytes": int}
ACK = {"ok": bool, "message": str}
MIN_CHUNK, MAX_CHUNK = 64 << 10, 64 << 20


def read_fetch(
    sock: socket.socket, source: BlockSource, memory: BlockMemory, deadline: Deadline
) -> tuple[str, list[int], int]:
    """Server side: receive a fetch and check it against what the engine holds.

    Returns (request_id, block_ids, chunk_bytes). The client may ask for any subset of the
    request's blocks, in any order, but nothing else: blocks of other requests are never served.
    """
    msg = recv_msg(sock, "fetch", FETCH, deadline)
    request_id = msg["request_id"]
    block_ids = int_list(msg["block_ids"], "fetch.block_ids")
    held = source.lookup(request_id)
    if held is None:
        raise KVTransferFailure(ErrorCode.UNKNOWN_REQUEST, f"no blocks held for {request_id!r}")
    not_held = sorted(set(block_ids) - set(held))
    if not_held or not block_ids:
        raise KVTransferFailure(
            ErrorCode.BAD_BLOCKS,
            f"blocks {not_held[:8]} are not held for {request_id!r}" if not_held else "no blocks",
        )
    bad = memory.check_ids(block_ids, "fetch.block_ids")
    if bad is not None:
        raise KVTransferFailure(ErrorCode.BAD_BLOCKS, bad)
    return request_id, block_ids, min(max(msg["chunk_bytes"], MIN_CHUNK), MAX_CHUNK)


def check_fetch_args(
    memory: BlockMemory, remote_block_ids: Sequence[int], local_block_ids: Sequence[int]
) -> None:
    """Client side: the caller's block lists, checked before any I/O."""
    if len(remote_block_ids) != len(local_block_ids) or not local_block_ids:
        raise KVTransferFailure(
            ErrorCode.BAD_BLOCKS,
            f"{len(remote_block_ids)} remote blocks for {len(local_block_ids)} local blocks",
        )
    if len(set(local_block_ids)) != len(local_block_ids):
        raise KVTransferFailure(ErrorCode.BAD_BLOCKS, "local block ids repeat")
    bad = memory.check_ids(local_block_ids, "local_block_ids")
    if bad is not None:
        raise KVTransferFailure(ErrorCode.BAD_BLOCKS, bad)


# Transport-specific halves of a transfer, run after the handshake (see tcp.py and shm.py).
PullFn = Callable[[socket.socket, str, Sequence[int], Sequence[int], Deadline, list[int]], None]
StreamFn = Callable[[socket.socket, list[int], int, Deadline], int]


@dataclass(frozen=True, slots=True)
class ServerConfig:
    handshake_timeout_s: float = 5.0
    transfer_timeout_s: float = 60.0


class Handler(NamedTuple):
    """One transport's server half: its memory (layout, id checks) and its stream function."""

    memory: BlockMemory
    stream: StreamFn


def serve_connection(
    sock: socket.socket,
    handlers: Mapping[str, Handler],
    auth: Authenticator,
    source: BlockSource,
    stats: ServerStats,
    config: ServerConfig,
) -> None:
    """Server side of one connection: handshake (the client names one of `handlers`' transports),
    fetch, that transport's stream, ack, `source.on_sent`. All handlers serve the same KV, so
    they share one layout. Failures are counted in `stats`; the peer is told why where the
    protocol allows."""
    stats.add(connections=1)
    layout = next(iter(handlers.values())).memory.layout
    try:
        deadline = Deadline(config.handshake_timeout_s, "handshake")
        _, name = server_handshake(sock, auth, layout, handlers.keys(), deadline)
        memory, stream = handlers[name]
        deadline = Deadline(config.transfer_timeout_s, "transfer")
        try:
            request_id, block_ids, chunk_bytes = read_fetch(sock, source, memory, deadline)
        except KVTransferFailure as exc:
            send_error(sock, exc.error.code, exc.error.message, deadline)
            raise
        sent = stream(sock, block_ids, chunk_bytes, deadline)
        ack = recv_msg(sock, "ack", ACK, deadline)
        if not ack["ok"]:
            raise KVTransferFailure(ErrorCode.PEER_ERROR, f"client: {ack['message']}")
        source.on_sent(request_id)
        stats.add(served=1, bytes_sent=sent)
    except KVTransferFailure as exc:
        stats.fail(exc.error.code)
        log.warning("kv transfer: serving a fetch failed (%s)", exc.error)


def run_fetch(
    name: str,
    memory: BlockMemory,
    auth: Authenticator,
    peer: Peer,
    request: tuple[str, Sequence[int], Sequence[int]],
    timeout_s: float,
    pull: PullFn,
) -> TransferResult:
    """Client side of one fetch: the `TransportClient.fetch` contract around `pull`."""
    request_id, remote_block_ids, local_block_ids = request
    start = time.monotonic()
    progress = [0]
    try:
        deadline = Deadline(timeout_s, f"fetch of {request_id!r}")
        check_fetch_args(memory, remote_block_ids, local_block_ids)
        with connect(peer, deadline) as sock:
            client_handshake(sock, auth, memory.layout, name, deadline)
            pull(sock, request_id, remote_block_ids, local_block_ids, deadline, progress)
    except KVTransferFailure as exc:
        return TransferResult(False, progress[0], time.monotonic() - start, exc.error)
    except ValueError as exc:  # a non-positive timeout
        error = TransferError(ErrorCode.INTERNAL, str(exc))
        return TransferResult(False, 0, time.monotonic() - start, error)
    except RuntimeError as exc:  # a CUDA/NCCL error or OOM inside the transport: data, too
        log.warning("kv transfer: fetch of %r failed inside %s: %s", request_id, name, exc)
        error = TransferError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        return TransferResult(False, progress[0], time.monotonic() - start, error)
    return TransferResult(True, progress[0], time.monotonic() - start, None)
