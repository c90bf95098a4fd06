"""Shared-memory transport for engines on one host: blocks move through a staging ring.

Control (handshake, fetch, per-chunk notices) runs over a loopback TCP socket exactly as in
`tcp.py`; payload bytes move through a `multiprocessing.shared_memory` segment of `slots`
chunk-sized slots that the server creates per connection (mode 0600, random name) and unlinks as
soon as the client has mapped it:

    server -> client  shm_stream {total, chunks, chunk_bytes, segment, slots}
    client -> server  attached {}
    server -> client  chunk {index, slot, length, crc}   (after copying blocks into the slot)
    client -> server  free {slot}                         (after copying the slot into blocks)
    client -> server  ack {ok, message}

The server computes CRC-32 over the slot after filling it and the client over its destination
blocks after copying, so anything that scribbles on the staging memory in between is caught as
CORRUPT. Up to `slots` chunks are in flight, so copy-in and copy-out overlap.

Memory: the server reads and the client writes the engine's tensors in place, as in `tcp.py`;
each side owns and releases its mapping of the staging segment within the one connection.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import secrets
import socket
from collections.abc import Sequence
from multiprocessing import shared_memory
from typing import TYPE_CHECKING, Any

from meshd.kv_transfer.blocks import DEFAULT_CHUNK_BYTES, chunks, crc32, nbytes
from meshd.kv_transfer.conn import (
    MAX_CHUNK,
    MIN_CHUNK,
    Handler,
    run_fetch,
)
from meshd.kv_transfer.memory import byte_memory
from meshd.kv_transfer.tcp import check_stream
from meshd.kv_transfer.transport import (
    Deadline,
    ErrorCode,
    KVTransferFailure,
    Peer,
    TransferResult,
)
from meshd.kv_transfer.wire import recv_msg, send_msg

if TYPE_CHECKING:
    import torch

    from meshd.kv_transfer.auth import Authenticator
    from meshd.kv_transfer.layout import BlockLayout

NAME = "shm"
DEFAULT_SLOTS = 4
SHM_STREAM = {"total": int, "chunks": int, "chunk_bytes": int, "segment": str, "slots": int}
CHUNK = {"index": int, "slot": int, "length": int, "crc": int}
FREE = {"slot": int}


def _copy(dst: Sequence[memoryview], src: Sequence[memoryview]) -> None:
    """Copy the concatenation of `src` into the concatenation of `dst` (equal total length)."""
    di, doff = 0, 0
    for piece in src:
        off = 0
        while off < len(piece):
            room = len(dst[di]) - doff
            take = min(room, len(piece) - off)
            dst[di][doff : doff + take] = piece[off : off + take]
            off, doff = off + take, doff + take
            if doff == len(dst[di]):
                di, doff = di + 1, 0


class ShmSender:
    """The shared-memory transport's serving half (a `mux.MuxServer` listens, authenticates and
    checks the fetch): streams held blocks through a staging ring to a client on this host."""

    def __init__(self, kv_caches: Sequence[torch.Tensor], layout: BlockLayout,
                 slots: int = DEFAULT_SLOTS, views: str = "engine") -> None:
        if slots < 1:
            raise ValueError(f"slots: must be >= 1, got {slots}")
        self._memory = byte_memory(kv_caches, layout, views)
        self.name = NAME + self._memory.wire_suffix
        self._slots = slots
        self.handler = Handler(self._memory, self._stream)

    def close(self) -> None:
        pass  # each connection's segment is released by the connection itself

    def _stream(
        self, sock: socket.socket, block_ids: list[int], chunk_bytes: int, deadline: Deadline
    ) -> int:
        total = self._memory.stream_bytes(len(block_ids))
        count = math.ceil(total / chunk_bytes)
        slots = min(self._slots, count)
        seg = shared_memory.SharedMemory(
            name=f"meshd-kv-{secrets.token_hex(8)}", create=True, size=slots * chunk_bytes
        )
        buf = seg.buf
        assert buf is not None  # set for a mapped segment
        views = [buf[i * chunk_bytes : (i + 1) * chunk_bytes] for i in range(slots)]
        try:
            send_msg(sock, {"t": "shm_stream", "total": total, "chunks": count,
                            "chunk_bytes": chunk_bytes, "segment": seg.name, "slots": slots},
                     deadline)
            recv_msg(sock, "attached", {}, deadline)
            seg.unlink()  # mapped on both sides now; nothing left to leak if either dies
            freed = 0
            source = self._memory.read(block_ids, deadline)
            for index, pieces in enumerate(chunks(source, chunk_bytes)):
                if index - freed >= slots:
                    self._await_free(sock, freed % slots, deadline)
                    freed += 1
                # released even when the peer is gone mid-copy: an exported slice would make
                # the segment's close() fail (BufferError) and leak the mapping
                with views[index % slots][: nbytes(pieces)] as slot:
                    _copy([slot], pieces)
                    crc = crc32([slot])
                    length = len(slot)
                send_msg(sock, {"t": "chunk", "index": index, "slot": index % slots,
                                "length": length, "crc": crc}, deadline)
            for _ in range(freed, count):
                self._await_free(sock, freed % slots, deadline)
                freed += 1
            return total
        finally:
            for view in views:
                view.release()
            seg.close()
            _unlink_quietly(seg)

    @staticmethod
    def _await_free(sock: socket.socket, slot: int, deadline: Deadline) -> None:
        msg = recv_msg(sock, "free", FREE, deadline)
        if msg["slot"] != slot:
            raise KVTransferFailure(
                ErrorCode.PROTOCOL, f"freed slot {msg['slot']}, expected {slot}"
            )


def _unlink_quietly(seg: shared_memory.SharedMemory) -> None:
    with contextlib.suppress(FileNotFoundError):
        seg.unlink()


class ShmClient:
    """Pulls blocks from a same-host server into local blocks (see `TransportClient`)."""

    name = NAME

    def __init__(
        self,
        kv_caches: Sequence[torch.Tensor],
        layout: BlockLayout,
        auth: Authenticator,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        views: str = "engine",
    ) -> None:
        if not MIN_CHUNK <= chunk_bytes <= MAX_CHUNK:
            raise ValueError(f"chunk_bytes: must be in {MIN_CHUNK}..{MAX_CHUNK}")
        self._memory = byte_memory(kv_caches, layout, views)
        self.name = NAME + self._memory.wire_suffix
        self._auth = auth
        self._chunk_bytes = chunk_bytes

    def close(self) -> None:
        pass

    def fetch(
        self,
        peer: Peer,
        remote_request_id: str,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        timeout_s: float,
    ) -> TransferResult:
        request = (remote_request_id, remote_block_ids, local_block_ids)
        return run_fetch(self.name, self._memory, self._auth, peer, request, timeout_s,
                         self._pull)

    def _pull(
        self,
        sock: socket.socket,
        request_id: str,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        deadline: Deadline,
        progress: list[int],
    ) -> None:
        send_msg(sock, {"t": "fetch", "request_id": request_id,
                        "block_ids": list(remote_block_ids), "chunk_bytes": self._chunk_bytes},
                 deadline)
        stream = recv_msg(sock, "shm_stream", SHM_STREAM, deadline)
        chunk_bytes = check_stream(
            {k: stream[k] for k in ("total", "chunks", "chunk_bytes")},
            self._memory.stream_bytes(len(local_block_ids)),
        )
        slots = stream["slots"]
        seg = _attach(stream["segment"], slots * chunk_bytes)
        try:
            send_msg(sock, {"t": "attached"}, deadline)
            segments, commit = self._memory.write(local_block_ids)
            dest = chunks(segments, chunk_bytes)
            for index, pieces in enumerate(dest):
                msg = recv_msg(sock, "chunk", CHUNK, deadline)
                if (msg["index"], msg["slot"], msg["length"]) != (
                    index, index % slots, nbytes(pieces)
                ):
                    raise KVTransferFailure(ErrorCode.PROTOCOL, f"chunk {msg}, expected {index}")
                self._read_slot(seg, msg["slot"] * chunk_bytes, pieces)
                progress[0] += nbytes(pieces)
                if crc32(pieces) != msg["crc"]:
                    send_msg(sock, {"t": "ack", "ok": False, "message": f"chunk {index} corrupt"},
                             deadline)
                    raise KVTransferFailure(ErrorCode.CORRUPT, f"chunk {index}: crc32 mismatch")
                send_msg(sock, {"t": "free", "slot": msg["slot"]}, deadline)
            commit(deadline)
            send_msg(sock, {"t": "ack", "ok": True, "message": ""}, deadline)
        finally:
            seg.close()

    @staticmethod
    def _read_slot(seg: _Mapping, offset: int, pieces: list[memoryview]) -> None:
        with seg.buf[offset : offset + nbytes(pieces)] as slot:
            _copy(pieces, [slot])


class _Mapping:
    """The client's read-write mapping of the server's segment. Mapped from /dev/shm directly so
    this process's multiprocessing resource tracker never adopts (and later unlinks) it."""

    def __init__(self, name: str, size: int) -> None:
        fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
        try:
            self._mmap = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.buf = memoryview(self._mmap)

    def close(self) -> None:
        self.buf.release()
        self._mmap.close()


def _attach(name: str, size: int) -> _Mapping:
    if not name.startswith("meshd-kv-") or not name[9:].isalnum():
        raise KVTransferFailure(ErrorCode.PROTOCOL, f"refusing shared memory segment {name!r}")
    try:
        return _Mapping(name, size)
    except (OSError, ValueError) as exc:  # missing, or smaller than announced
        raise KVTransferFailure(ErrorCode.CONNECT, f"cannot map {name!r}: {exc}") from exc


def make_client(
    kv_caches: Sequence[torch.Tensor], layout: BlockLayout, auth: Authenticator, **options: Any
) -> ShmClient:
    return ShmClient(kv_caches, layout, auth, **options)


def make_sender(kv_caches: Sequence[torch.Tensor], layout: BlockLayout,
                **options: Any) -> ShmSender:
    return ShmSender(kv_caches, layout, **options)
