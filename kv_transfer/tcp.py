"""TCP transport: the prefill side serves held blocks, the decode side pulls them.

One connection per fetch: handshake (auth + layout), then

    client -> server  fetch  {request_id, block_ids, chunk_bytes}
    server -> client  stream {total, chunks, chunk_bytes}   |  error {code, message}
    server -> client  chunks: 12-byte header (index, length, crc32, big-endian) + payload
    client -> server  ack    {ok, message}

Payload bytes go from the source tensor's memory to the socket with scatter-gather `sendmsg`,
and from the socket straight into the destination blocks with `recvmsg_into`: no staging copy
on either side for CPU KV. CUDA KV is staged through host buffers (`memory.StagedKV`), so this
is also the GPU fallback between hosts with no NCCL fabric. Each chunk's index, length and
CRC-32 are checked before and after receiving, so corruption, truncation and wrong lengths
become `TransferError`s. The server calls `source.on_sent(request_id)` only after the client
acknowledged an intact copy; on any failure the blocks stay held until the engine's own lease
timeout.
"""

from __future__ import annotations

import math
import socket
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from meshd.kv_transfer.blocks import DEFAULT_CHUNK_BYTES, chunks, crc32, nbytes
from meshd.kv_transfer.conn import (
    MAX_CHUNK,
    MIN_CHUNK,
    Handler,
    run_fetch,
)
from meshd.kv_transfer.memory import byte_memory
from meshd.kv_transfer.transport import (
    Deadline,
    ErrorCode,
    KVTransferFailure,
    Peer,
    TransferResult,
)
from meshd.kv_transfer.wire import recv_exact, recv_into_all, recv_msg, send_all, send_msg

if TYPE_CHECKING:
    import torch

    from meshd.kv_transfer.auth import Authenticator
    from meshd.kv_transfer.layout import BlockLayout

NAME = "tcp"
CHUNK_HEADER = struct.Struct(">III")  # index, payload length, crc32
STREAM = {"total": int, "chunks": int, "chunk_bytes": int}


def check_stream(stream: dict[str, int], total: int) -> int:
    """Client side: the announced stream must match what we expect. Returns chunk_bytes."""
    chunk_bytes = stream["chunk_bytes"]
    if stream["total"] != total or not MIN_CHUNK <= chunk_bytes <= MAX_CHUNK or (
        stream["chunks"] != math.ceil(total / chunk_bytes)
    ):
        raise KVTransferFailure(
            ErrorCode.PROTOCOL, f"server announced {stream}, expected {total} bytes"
        )
    return chunk_bytes


class TcpSender:
    """The TCP transport's serving half: streams held blocks in CRC-checked chunks. A
    `mux.MuxServer` listens, authenticates and checks the fetch before calling it.

    Memory: reads the engine's KV tensors in place (views kept until `close`); never writes."""

    def __init__(self, kv_caches: Sequence[torch.Tensor], layout: BlockLayout,
                 views: str = "engine") -> None:
        self._memory = byte_memory(kv_caches, layout, views)
        self.name = NAME + self._memory.wire_suffix
        self.handler = Handler(self._memory, self._stream)

    def close(self) -> None:
        pass  # holds nothing beyond views of the engine's tensors

    def _stream(
        self, sock: socket.socket, block_ids: list[int], chunk_bytes: int, deadline: Deadline
    ) -> int:
        total = self._memory.stream_bytes(len(block_ids))
        count = math.ceil(total / chunk_bytes)
        send_msg(sock, {"t": "stream", "total": total, "chunks": count, "chunk_bytes": chunk_bytes},
                 deadline)
        for index, pieces in enumerate(chunks(self._memory.read(block_ids, deadline),
                                              chunk_bytes)):
            header = CHUNK_HEADER.pack(index, nbytes(pieces), crc32(pieces))
            send_all(sock, [header, *pieces], deadline)
        return total


class TcpClient:
    """Pulls remote blocks into the engine's local blocks (see `TransportClient`).

    Memory: writes only the local blocks named in a fetch, in place; thread-safe."""

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
        pass  # no pooled connections yet

    def fetch(
        self,
        peer: Peer,
        remote_request_id: str,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        timeout_s: float,
    ) -> TransferResult:
        request = (remote_request_id, remote_block_ids, local_block_ids)
        return run_fetch(self.name, self._memory, self._auth, peer, request, timeout_s, self._pull)

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
        stream = recv_msg(sock, "stream", STREAM, deadline)
        chunk_bytes = check_stream(stream, self._memory.stream_bytes(len(local_block_ids)))
        segments, commit = self._memory.write(local_block_ids)
        for index, pieces in enumerate(chunks(segments, chunk_bytes)):
            got_index, length, crc = CHUNK_HEADER.unpack(
                recv_exact(sock, CHUNK_HEADER.size, deadline)
            )
            if got_index != index or length != nbytes(pieces):
                raise KVTransferFailure(
                    ErrorCode.PROTOCOL,
                    f"chunk header ({got_index}, {length} B), "
                    f"expected ({index}, {nbytes(pieces)} B)",
                )
            progress[0] += recv_into_all(sock, pieces, deadline)
            if crc32(pieces) != crc:
                send_msg(sock, {"t": "ack", "ok": False, "message": f"chunk {index} corrupt"},
                         deadline)
                raise KVTransferFailure(ErrorCode.CORRUPT, f"chunk {index}: crc32 mismatch")
        commit(deadline)
        send_msg(sock, {"t": "ack", "ok": True, "message": ""}, deadline)


def make_client(
    kv_caches: Sequence[torch.Tensor], layout: BlockLayout, auth: Authenticator, **options: Any
) -> TcpClient:
    return TcpClient(kv_caches, layout, auth, **options)


def make_sender(kv_caches: Sequence[torch.Tensor], layout: BlockLayout,
                **options: Any) -> TcpSender:
    return TcpSender(kv_caches, layout, **options)
