"""NCCL transport (through cupy) for CUDA KV caches on different GPUs, usually different hosts.

Control runs over meshd's authenticated TCP connection (`conn.py`: mutual handshake, fetch checked
against the engine's held blocks, ack, `on_sent`); payload moves GPU to GPU with NCCL send/recv:

    client -> server  fetch       {request_id, block_ids, chunk_bytes}   (as in tcp.py)
    client -> server  nccl_hello  {comm_id}          16 random bytes naming the client's pair comm
    server -> client  nccl_stream {total, uid}       uid = b"" (reuse comm_id's communicator) or
                                                     a fresh 128-byte ncclUniqueId: both ranks
                                                     init `NcclCommunicator(2, uid, rank)`
    server (rank 0)   gather blocks per layer, grouped ncclSend of each layer's buffer
    client (rank 1)   grouped ncclRecv into per-layer buffers, scatter into local blocks
    client -> server  ack {ok, message}

One communicator per peer pair (client keys it by server address, server by comm_id), reused
across fetches and serialized by a lock (NCCL ops on one communicator must not interleave).
Waits poll a CUDA event against the fetch deadline; on timeout the communicator is aborted
(`ncclCommAbort`) and dropped, so the next fetch builds a new one.

Security: the handshake authenticates both peers before the uid is sent, but the control
connection is not encrypted and NCCL's own bootstrap is unauthenticated: whoever learns a uid
before both ranks joined could race to join. Run NCCL transfers on a trusted fabric.

Library policy (`check_single_nccl`): torch and cupy must use the same libnccl. Two different
libnccl builds in one process keep separate global state (bootstrap, proxy threads, IB
resources) and can hang or crash; we refuse to start rather than pick one silently. Fix: install
the `nvidia-nccl-cu12` wheel torch was built against so cupy finds the same file, or start the
worker with `LD_PRELOAD=<torch's libnccl.so.2>`.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from meshd.kv_transfer.conn import (
    MIN_CHUNK,
    Handler,
    run_fetch,
)
from meshd.kv_transfer.gpu_blocks import GpuKV, wait_stream
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

NAME = "nccl"
UID_BYTES = 128  # NCCL_UNIQUE_ID_BYTES
MAX_COMMS = 64  # server side: pair communicators kept (LRU beyond that are destroyed)
HELLO = {"comm_id": bytes}
STREAM = {"total": int, "uid": bytes}
# the core library only: NCCL's own plugins (libnccl-net.so, libnccl-tuner.so) are not copies
_LIBNCCL = re.compile(r"(\S*/libnccl\.so(?:\.\d+)*)$")


# --- which libnccl: pure helpers (tested on CPU) and the guard -------------------------------

def nccl_libraries(maps: str) -> list[str]:
    """Distinct libnccl files mapped in a process, from the text of `/proc/<pid>/maps`."""
    found = {os.path.realpath(m.group(1)) for line in maps.splitlines()
             if (m := _LIBNCCL.search(line.strip()))}
    return sorted(found)


def check_single_nccl(libraries: Sequence[str]) -> str | None:
    """None when one libnccl file is mapped into the process (torch's and cupy's); else why not.
    (Versions are not compared: `torch.cuda.nccl.version()` is the version torch was *built*
    against, not the library loaded, so a mismatch there proves nothing.)"""
    if len(libraries) > 1:
        return f"{len(libraries)} libnccl copies are loaded: {', '.join(libraries)}"
    return None


def load_nccl() -> Any:
    """Import cupy's NCCL binding after torch's CUDA, then apply the one-libnccl policy.
    Returns `cupy.cuda.nccl`; raises RuntimeError naming the libraries on a conflict."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("nccl transport: CUDA is not available in this process")
    torch.cuda.init()
    from cupy.cuda import nccl

    if not getattr(nccl, "available", True):  # cupy imports, but its NCCL binding did not load
        raise RuntimeError("nccl transport: cupy's NCCL binding is not available (libnccl not "
                           "found by cupy)")
    nccl.get_version()  # make sure the library is loaded before looking at the mappings
    with open("/proc/self/maps") as f:
        libraries = nccl_libraries(f.read())
    problem = check_single_nccl(libraries)
    if problem is not None:
        raise RuntimeError(f"nccl transport: {problem}. Install the nvidia-nccl-cu12 wheel "
                           f"matching torch, or LD_PRELOAD torch's libnccl.so.2")
    return nccl


def uid_to_bytes(uid: Iterable[int]) -> bytes:
    """cupy's unique id is a tuple of 128 signed chars; the wire carries raw bytes."""
    return bytes(v & 0xFF for v in uid)


def uid_from_bytes(data: bytes) -> tuple[int, ...]:
    if len(data) != UID_BYTES:
        raise KVTransferFailure(ErrorCode.PROTOCOL, f"nccl uid must be {UID_BYTES} bytes")
    return tuple(b - 256 if b > 127 else b for b in data)


# --- one pair communicator -------------------------------------------------------------------

class PairComm:
    """A 2-rank NCCL communicator plus the lock that serializes its use and a side stream.

    `NcclCommunicator(2, uid, rank)` blocks until both ranks have called it (NCCL bootstrap over
    TCP to the uid's address); NCCL offers no deadline here (cupy exposes no non-blocking
    config), so it is called only right after the peer, over an authenticated connection, said
    it will join too. `send`/`recv(ptr, count, datatype, peer, stream)` enqueue on `stream` and
    return at once; the data is valid/readable only when that stream's work completes."""

    def __init__(self, nccl: Any, uid: tuple[int, ...], rank: int, device: int) -> None:
        import cupy
        import torch

        self.nccl, self.rank, self.device = nccl, rank, device
        self.lock = threading.Lock()
        with cupy.cuda.Device(device):
            self.comm = nccl.NcclCommunicator(2, uid, rank)
        self.stream = torch.cuda.Stream(device=device)

    def exchange(self, bufs: Sequence[torch.Tensor], send: bool, deadline: Deadline) -> None:
        """Send (rank 0) or receive (rank 1) every buffer, as bytes, in one NCCL group; wait
        for completion. On timeout abort the communicator (`close()` it after)."""
        import cupy
        import torch

        peer = 1 - self.rank
        with cupy.cuda.Device(self.device), torch.cuda.stream(self.stream):
            s = torch.cuda.current_stream().cuda_stream
            self.nccl.groupStart()
            try:
                for buf in bufs:
                    op = self.comm.send if send else self.comm.recv
                    op(buf.data_ptr(), buf.numel() * buf.element_size(), self.nccl.NCCL_UINT8,
                       peer, s)
            except Exception:
                self.comm.abort()  # never leave this (pooled) thread inside an open group
                raise
            finally:
                self.nccl.groupEnd()
        try:
            wait_stream(self.stream, deadline.at, f"nccl {'send' if send else 'recv'}")
        except KVTransferFailure:
            self.comm.abort()
            raise

    def close(self, abort: bool = False) -> None:
        """Destroy the communicator; `abort` when the peer may be gone or mid-operation
        (`ncclCommDestroy` could wait for it; cupy's abort makes a later destroy a no-op)."""
        if abort:
            self.comm.abort()
        else:
            self.comm.destroy()


class NcclSender:
    """The NCCL transport's serving half (a `mux.MuxServer` listens, authenticates and checks
    the fetch; see the module docstring): sends held blocks over a pair communicator.

    Memory: reads the engine's CUDA KV tensors (gather into temporary buffers); never writes."""

    def __init__(self, kv_caches: Sequence[torch.Tensor], layout: BlockLayout,
                 views: str = "engine") -> None:
        self._kv = GpuKV(kv_caches, layout, views)  # refuses non-CUDA tensors first
        self._nccl = load_nccl()
        self.name = NAME + self._kv.wire_suffix
        self._comms: OrderedDict[bytes, PairComm] = OrderedDict()
        self._comms_lock = threading.Lock()
        self.handler = Handler(self._kv, self._stream)

    def close(self) -> None:
        with self._comms_lock:
            for pc in self._comms.values():
                pc.close()
            self._comms.clear()

    def _stream(self, sock: socket.socket, block_ids: list[int], _chunk: int,
                deadline: Deadline) -> int:
        comm_id = recv_msg(sock, "nccl_hello", HELLO, deadline)["comm_id"]
        total = self._kv.stream_bytes(len(block_ids))
        with self._comms_lock:
            pc = self._comms.get(comm_id)
            if pc is not None:
                self._comms.move_to_end(comm_id)
        uid = b"" if pc is not None else uid_to_bytes(self._nccl.get_unique_id())
        send_msg(sock, {"t": "nccl_stream", "total": total, "uid": uid}, deadline)
        if pc is None:
            pc = self._add(comm_id, PairComm(self._nccl, uid_from_bytes(uid), 0,
                                             self._kv.device_index))
        import torch

        with pc.lock:
            with torch.cuda.stream(pc.stream):
                bufs = self._kv.gather(block_ids)
            try:
                pc.exchange(bufs, send=True, deadline=deadline)
            except BaseException:
                self._drop(comm_id)
                raise
        return total

    def _add(self, comm_id: bytes, pc: PairComm) -> PairComm:
        with self._comms_lock:
            self._comms[comm_id] = pc
            while len(self._comms) > MAX_COMMS:
                self._comms.popitem(last=False)[1].close()
        return pc

    def _drop(self, comm_id: bytes) -> None:
        with self._comms_lock:
            pc = self._comms.pop(comm_id, None)
        if pc is not None:
            pc.close(abort=True)


class NcclClient:
    """Pulls remote blocks over NCCL into local CUDA blocks (see `TransportClient`).

    Memory: writes only the local blocks named in a fetch, in place, after the whole receive
    completed; a failed fetch leaves them untouched. Thread-safe; fetches to one peer serialize."""

    name = NAME

    def __init__(self, kv_caches: Sequence[torch.Tensor], layout: BlockLayout,
                 auth: Authenticator, views: str = "engine") -> None:
        self._kv = GpuKV(kv_caches, layout, views)  # refuses non-CUDA tensors first
        self._nccl = load_nccl()
        self.name = NAME + self._kv.wire_suffix
        self._auth = auth
        self._pairs: dict[Peer, tuple[bytes, PairComm | None, threading.Lock]] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for _, pc, _ in self._pairs.values():
                if pc is not None:
                    pc.close()
            self._pairs.clear()

    def fetch(self, peer: Peer, remote_request_id: str, remote_block_ids: Sequence[int],
              local_block_ids: Sequence[int], timeout_s: float) -> TransferResult:
        with self._lock:
            entry = self._pairs.setdefault(peer, (os.urandom(16), None, threading.Lock()))
        with entry[2]:  # one fetch per peer pair at a time
            request = (remote_request_id, remote_block_ids, local_block_ids)
            return run_fetch(self.name, self._kv, self._auth, peer, request, timeout_s,
                             functools.partial(self._pull, peer))

    def _pull(self, peer: Peer, sock: socket.socket, request_id: str,
              remote_block_ids: Sequence[int], local_block_ids: Sequence[int],
              deadline: Deadline, progress: list[int]) -> None:
        comm_id, pc, pair_lock = self._pairs[peer]
        send_msg(sock, {"t": "fetch", "request_id": request_id,
                        "block_ids": list(remote_block_ids), "chunk_bytes": MIN_CHUNK}, deadline)
        send_msg(sock, {"t": "nccl_hello", "comm_id": comm_id}, deadline)
        stream = recv_msg(sock, "nccl_stream", STREAM, deadline)
        total = self._kv.stream_bytes(len(local_block_ids))
        if stream["total"] != total:
            raise KVTransferFailure(ErrorCode.PROTOCOL,
                                    f"server announced {stream['total']} bytes, expected {total}")
        import torch

        try:
            if stream["uid"] or pc is None:  # the server (re)built the pair: so do we
                if pc is not None:
                    pc.close(abort=True)
                    pc = None
                if not stream["uid"]:
                    raise KVTransferFailure(ErrorCode.PROTOCOL,
                                            "server reuses a pair communicator we do not have")
                pc = PairComm(self._nccl, uid_from_bytes(stream["uid"]), 1,
                              self._kv.device_index)
                self._pairs[peer] = (comm_id, pc, pair_lock)
            with torch.cuda.stream(pc.stream):
                bufs = self._kv.empty(len(local_block_ids))
            pc.exchange(bufs, send=False, deadline=deadline)
            with torch.cuda.stream(pc.stream):
                self._kv.scatter(local_block_ids, bufs)
            wait_stream(pc.stream, deadline.at, "scatter into local blocks")
        except BaseException:
            # any failure (timeout, NCCL or CUDA error, OOM): drop the pair on our side; the
            # next fetch sends a fresh comm_id, so the server builds a new one too
            if pc is not None:
                pc.close(abort=True)
            self._pairs[peer] = (os.urandom(16), None, pair_lock)
            raise
        progress[0] += total
        send_msg(sock, {"t": "ack", "ok": True, "message": ""}, deadline)


def make_client(kv_caches: Sequence[torch.Tensor], layout: BlockLayout, auth: Authenticator,
                **options: Any) -> NcclClient:
    return NcclClient(kv_caches, layout, auth, **options)


def make_sender(kv_caches: Sequence[torch.Tensor], layout: BlockLayout,
                **options: Any) -> NcclSender:
    return NcclSender(kv_caches, layout, **options)
