"""NCCL transport (through cupy) for CUDA KV caches on different GPUs, usually different hosts.

Control runs over meshd's authenticated TCP connection (`conn.py`: mutual handshake, fetch checked
against the engine's held blocks, ack, `on_sent`); payload moves GPU to GPU with NCCL send/recv:

    client -> server  fetch       {request_id, block_ids, chunk_bytes}   (as in tcp.py)
    client -> server  nccl_hello  {comm_id}          16 random bytes naming the client's pair comm
    server -> client  nccl_stream {total, uid, step}
                      uid = b"" (reuse comm_id's communicator) or a fresh 128-byte ncclUniqueId;
                      step = blocks per step, from the fetch's chunk_bytes (client checks it)
    client -> server  nccl_join {}   only with a fresh uid, once the client accepted the stream:
                      then both ranks init `NcclCommunicator(2, uid, rank)` and exchange one
                      byte (`Inits.run`: each side waits only until its deadline)
    per step          server (rank 0) gathers `step` blocks per layer and sends the layer
                      buffers in one NCCL group; client (rank 1) receives them in one group
                      and scatters them into its blocks (queued on the pair's stream, at most
                      two steps in flight: `streams.StepWindow`)
    client -> server  ack {ok, message}

One communicator per peer pair (client keys it by server address, server by comm_id), reused
across fetches and serialized by a lock (NCCL ops on one communicator must not interleave), with
its own CUDA stream. Device memory per fetch is about two steps (`chunk_bytes`, default
`gpu_blocks.GPU_CHUNK_BYTES`), whatever the prompt length, from a pool shared by all pairs of a
device. Waits poll a CUDA event against the fetch deadline; on timeout or any error the
communicator is aborted (`ncclCommAbort`) and dropped on both sides, so the next fetch builds a
new one; the client lets queued scatters finish before it reports the failure.

Security: the handshake authenticates both peers before the uid is sent, but the control
connection is not encrypted and NCCL's own bootstrap is unauthenticated: whoever learns a uid
before both ranks joined could race to join. Run NCCL transfers on a trusted fabric.

The pair communicator itself (library guard, unique id, setup with a deadline, private stream,
stepped transfer) is in `nccl_pair.py`.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshd.kv_transfer.conn import (
    MAX_CHUNK,
    MIN_CHUNK,
    Handler,
    run_fetch,
)
from meshd.kv_transfer.gpu_blocks import GPU_CHUNK_BYTES, GpuKV
from meshd.kv_transfer.nccl_pair import (
    UID_BYTES,
    Inits,
    PairComm,
    close_late,
    close_pairs,
    load_nccl,
    peer_check,
    transfer,
    uid_to_bytes,
)
from meshd.kv_transfer.transport import (
    Deadline,
    ErrorCode,
    KVTransferFailure,
    Peer,
    TransferError,
    TransferResult,
)
from meshd.kv_transfer.wire import recv_msg, send_msg

if TYPE_CHECKING:
    import torch

    from meshd.kv_transfer.auth import Authenticator
    from meshd.kv_transfer.layout import BlockLayout

log = logging.getLogger(__name__)

NAME = "nccl"
MAX_COMMS = 64  # server side: pair communicators kept (LRU beyond that, if idle, are destroyed)
CLOSE_GRACE_S = 5.0  # close(): how long to wait for busy pairs before leaving them
HELLO = {"comm_id": bytes}
STREAM = {"total": int, "uid": bytes, "step": int}


class NcclSender:
    """The NCCL transport's serving half (a `mux.MuxServer` listens, authenticates and checks
    the fetch; see the module docstring): sends held blocks over a pair communicator.

    Memory: reads the engine's CUDA KV tensors, gathering at most `chunk_bytes` (the client's,
    from the fetch) of blocks per step, `STEP_DEPTH` steps in flight, into buffers from the
    device's shared pool; never writes."""

    def __init__(self, kv_caches: Sequence[torch.Tensor], layout: BlockLayout,
                 views: str = "engine") -> None:
        self._kv = GpuKV(kv_caches, layout, views)  # refuses non-CUDA tensors first
        self._nccl = load_nccl()
        self.name = NAME + self._kv.wire_suffix
        self._comms: OrderedDict[bytes, PairComm] = OrderedDict()
        self._comms_lock = threading.Lock()
        self._closed = False
        self._inits = Inits()
        self.handler = Handler(self._kv, self._stream)

    def close(self) -> None:
        with self._comms_lock:
            self._closed = True
            pairs = [(pc, pc.lock) for pc in self._comms.values()]
            self._comms.clear()
        close_pairs(pairs, CLOSE_GRACE_S)

    def _stream(self, sock: socket.socket, block_ids: list[int], chunk: int,
                deadline: Deadline) -> int:
        comm_id = recv_msg(sock, "nccl_hello", HELLO, deadline)["comm_id"]
        total = self._kv.stream_bytes(len(block_ids))
        step = self._kv.blocks_per_step(chunk)
        with self._comms_lock:
            pc = self._comms.get(comm_id)
            if pc is not None:
                self._comms.move_to_end(comm_id)
        uid = b""
        if pc is None:
            self._inits.check("nccl pair setup")  # before the client is told to join
            uid = uid_to_bytes(self._nccl.get_unique_id())
        send_msg(sock, {"t": "nccl_stream", "total": total, "uid": uid, "step": step}, deadline)
        if pc is None:
            # set up only once the client accepted the stream and joins: a client that
            # refuses never leaves our rank waiting in NCCL's bootstrap
            recv_msg(sock, "nccl_join", {}, deadline)
            device = self._kv.device_index
            gone = peer_check(sock, any_data=False)
            pc = self._add(comm_id, self._inits.run(
                lambda: PairComm(self._nccl, uid, 0, device, deadline.at, gone), deadline.at,
                "nccl pair setup", close_late, gone))
        with pc.lock:
            with self._comms_lock:
                if self._comms.get(comm_id) is not pc:  # evicted between lookup and lock
                    raise KVTransferFailure(ErrorCode.PEER_ERROR, "nccl pair was evicted")
            try:
                transfer(self._kv, pc, block_ids, step, True, deadline,
                         peer_check(sock, any_data=False))
            except BaseException:
                self._drop(comm_id)
                raise
        return total

    def _add(self, comm_id: bytes, pc: PairComm) -> PairComm:
        evicted = []
        with self._comms_lock:
            closed = self._closed
            if closed:
                evicted.append(pc)
            else:
                self._comms[comm_id] = pc
                for old in list(self._comms):  # least recently used pairs not in use
                    if len(self._comms) <= MAX_COMMS:
                        break
                    victim = self._comms[old]
                    if old != comm_id and not victim.lock.locked():
                        evicted.append(self._comms.pop(old))
        for victim in evicted:
            victim.close(abort=True)  # a transfer that raced for it re-checks and fails
        if closed:
            raise KVTransferFailure(ErrorCode.PEER_ERROR, "nccl transport is closed")
        return pc

    def _drop(self, comm_id: bytes) -> None:
        with self._comms_lock:
            pc = self._comms.pop(comm_id, None)
        if pc is not None:
            pc.close(abort=True, settle_first=True)


@dataclass(slots=True)
class _Pair:
    """The client's side of one peer pair; fields change only under `lock`."""

    comm_id: bytes
    lock: threading.Lock = field(default_factory=threading.Lock)
    pc: PairComm | None = None

    def reset(self) -> None:
        """Forget the communicator: the next fetch sends a fresh comm_id, so the server builds
        a new pair too (one it may still be sending on is never reused)."""
        self.comm_id, self.pc = os.urandom(16), None


class NcclClient:
    """Pulls remote blocks over NCCL into local CUDA blocks (see `TransportClient`).

    Memory: writes only the local blocks named in a fetch, `chunk_bytes` of blocks per step
    (receive buffer from the device's shared pool, then scatter), `STEP_DEPTH` steps in flight;
    after a failed fetch their contents are unspecified, and queued scatters have finished
    before `fetch` returns (`streams.settle`, up to its grace; logged if not). Thread-safe;
    fetches to one peer serialize."""

    name = NAME

    def __init__(self, kv_caches: Sequence[torch.Tensor], layout: BlockLayout,
                 auth: Authenticator, views: str = "engine",
                 chunk_bytes: int = GPU_CHUNK_BYTES) -> None:
        if not MIN_CHUNK <= chunk_bytes <= MAX_CHUNK:
            raise ValueError(f"chunk_bytes: must be in {MIN_CHUNK}..{MAX_CHUNK}")
        self._kv = GpuKV(kv_caches, layout, views)  # refuses non-CUDA tensors first
        self._nccl = load_nccl()
        self.name = NAME + self._kv.wire_suffix
        self._auth = auth
        self._chunk_bytes = chunk_bytes
        self._inits = Inits()
        self._pairs: dict[Peer, _Pair] = {}
        self._closed = False
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            entries = list(self._pairs.values())
            self._pairs.clear()
        end = time.monotonic() + CLOSE_GRACE_S
        for entry in entries:  # a fetch holds its pair's lock at most until its deadline
            if entry.lock.acquire(timeout=max(0.0, end - time.monotonic())):
                try:
                    if entry.pc is not None:
                        entry.pc.close(abort=True)
                    entry.reset()
                finally:
                    entry.lock.release()
            else:
                log.warning("nccl: a pair still busy at close was left open")

    def fetch(self, peer: Peer, remote_request_id: str, remote_block_ids: Sequence[int],
              local_block_ids: Sequence[int], timeout_s: float) -> TransferResult:
        with self._lock:
            closed = self._closed
            entry = None if closed else self._pairs.setdefault(peer, _Pair(os.urandom(16)))
        if entry is None:
            return TransferResult(False, 0, 0.0,
                                  TransferError(ErrorCode.INTERNAL, "nccl client is closed"))
        with entry.lock:  # one fetch per peer pair at a time
            request = (remote_request_id, remote_block_ids, local_block_ids)
            return run_fetch(self.name, self._kv, self._auth, peer, request, timeout_s,
                             functools.partial(self._pull, entry))

    def _pull(self, entry: _Pair, sock: socket.socket, request_id: str,
              remote_block_ids: Sequence[int], local_block_ids: Sequence[int],
              deadline: Deadline, progress: list[int]) -> None:
        queued = False
        try:
            send_msg(sock, {"t": "fetch", "request_id": request_id,
                            "block_ids": list(remote_block_ids),
                            "chunk_bytes": self._chunk_bytes}, deadline)
            send_msg(sock, {"t": "nccl_hello", "comm_id": entry.comm_id}, deadline)
            stream = recv_msg(sock, "nccl_stream", STREAM, deadline)
            total = self._kv.stream_bytes(len(local_block_ids))
            step = self._kv.blocks_per_step(self._chunk_bytes)
            if stream["total"] != total or stream["step"] != step:
                raise KVTransferFailure(
                    ErrorCode.PROTOCOL, f"server announced {stream['total']} bytes in steps "
                    f"of {stream['step']} blocks, expected {total} in steps of {step}")
            if self._closed:
                raise KVTransferFailure(ErrorCode.INTERNAL, "nccl client is closed")
            # the server sends nothing more until our ack, unless it failed
            failed = peer_check(sock, any_data=True)
            if stream["uid"] or entry.pc is None:  # the server (re)builds the pair: so do we
                if entry.pc is not None:
                    entry.pc.close(abort=True)
                    entry.pc = None
                if not stream["uid"]:
                    raise KVTransferFailure(ErrorCode.PROTOCOL,
                                            "server reuses a pair communicator we do not have")
                uid, device = stream["uid"], self._kv.device_index
                if len(uid) != UID_BYTES:
                    raise KVTransferFailure(ErrorCode.PROTOCOL,
                                            f"nccl uid must be {UID_BYTES} bytes")
                self._inits.check("nccl pair setup")  # refuse before joining, not after
                send_msg(sock, {"t": "nccl_join"}, deadline)
                entry.pc = self._inits.run(
                    lambda: PairComm(self._nccl, uid, 1, device, deadline.at, failed),
                    deadline.at, "nccl pair setup", close_late, failed)
            queued = True
            transfer(self._kv, entry.pc, local_block_ids, step, False, deadline, failed)
        except BaseException:
            # any failure (timeout, NCCL or CUDA error, OOM, a bad stream message): drop the
            # pair, letting queued scatters finish before the failure is reported
            if entry.pc is not None:
                entry.pc.close(abort=True, settle_first=queued)
            entry.reset()
            raise
        progress[0] += total
        send_msg(sock, {"t": "ack", "ok": True, "message": ""}, deadline)


def make_client(kv_caches: Sequence[torch.Tensor], layout: BlockLayout, auth: Authenticator,
                **options: Any) -> NcclClient:
    return NcclClient(kv_caches, layout, auth, **options)


def make_sender(kv_caches: Sequence[torch.Tensor], layout: BlockLayout,
                **options: Any) -> NcclSender:
    return NcclSender(kv_caches, layout, **options)
