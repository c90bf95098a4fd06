"""One NCCL pair communicator for the `nccl` transport (`nccl.py` speaks the protocol): the
one-libnccl guard, the unique id for both cupy APIs, pair setup with a deadline (`Inits`), the
communicator with its private stream (`PairComm`) and a stepped transfer over it (`transfer`).

Library policy (`check_single_nccl`): torch and cupy must use the same libnccl. Two different
libnccl builds in one process keep separate global state (bootstrap, proxy threads, IB
resources) and can hang or crash; we refuse to start rather than pick one silently. Fix: install
the `nvidia-nccl-cu12` wheel torch was built against so cupy finds the same file, or start the
worker with `LD_PRELOAD=<torch's libnccl.so.2>`.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from meshd.kv_transfer.gpu_blocks import GpuKV, spans
from meshd.kv_transfer.streams import (
    StepWindow,
    private_stream,
    release_stream,
    settle,
    step_buffers,
    wait_stream,
)
from meshd.kv_transfer.transport import Deadline, ErrorCode, KVTransferFailure

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
T = TypeVar("T")

UID_BYTES = 128  # NCCL_UNIQUE_ID_BYTES
MAX_STUCK_INITS = 16  # pair setups still blocked after their deadline before new ones are refused
STEP_DEPTH = 2  # transfer steps queued at once (each with its own buffers)
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


# Linux targets whose C `char` is unsigned: cupy gives and takes the unique id as C chars, so
# the same bytes are ints in -128..127 on x86_64 and 0..255 there (a wrong sign: OverflowError)
_UNSIGNED_CHAR = {"aarch64", "armv7l", "armv8l", "ppc64", "ppc64le", "riscv64", "s390x"}


def char_is_signed(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() not in _UNSIGNED_CHAR


def uid_to_bytes(uid: Iterable[int]) -> bytes:
    """cupy's unique id is a tuple of 128 C chars (signed or not); the wire carries raw bytes."""
    return bytes(v & 0xFF for v in uid)


def uid_from_bytes(data: bytes, signed: bool | None = None) -> tuple[int, ...]:
    """Wire bytes as the C chars this platform's cupy takes (`signed`: default, this machine's)."""
    if len(data) != UID_BYTES:
        raise KVTransferFailure(ErrorCode.PROTOCOL, f"nccl uid must be {UID_BYTES} bytes")
    signed = char_is_signed() if signed is None else signed
    return tuple(b - 256 if signed and b > 127 else b for b in data)


def cupy_uid(data: bytes, cupy_major: int) -> bytes | tuple[int, ...]:
    """The unique id as `NcclCommunicator` takes it: cupy >= 14 takes (and `get_unique_id`
    returns) `bytes`; cupy 13 a tuple of C chars."""
    if cupy_major >= 14:
        if len(data) != UID_BYTES:
            raise KVTransferFailure(ErrorCode.PROTOCOL, f"nccl uid must be {UID_BYTES} bytes")
        return bytes(data)
    return uid_from_bytes(data)


def cupy_major() -> int:
    import cupy

    return int(str(cupy.__version__).split(".")[0])


def peer_check(sock: socket.socket, any_data: bool) -> Callable[[], None]:
    """A `streams.poll_event` check that fails fast when the peer closed the control
    connection or, with `any_data`, sent anything at all (during the data phase a server only
    writes to report a failure). Never consumes bytes."""

    poller = select.poll()
    poller.register(sock, select.POLLIN)

    def check() -> None:
        if not poller.poll(0):  # nothing to read, no hang-up: never blocks (sockets here carry
            return              # a timeout, which would make even a MSG_DONTWAIT recv wait)
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except OSError as exc:
            raise KVTransferFailure(ErrorCode.PEER_ERROR, f"control connection: {exc}") from exc
        if not data:
            raise KVTransferFailure(ErrorCode.PEER_ERROR, "peer closed the control connection")
        if any_data:
            raise KVTransferFailure(ErrorCode.PEER_ERROR, "peer reported a failure mid-transfer")

    return check


# --- pair setup with a deadline ----------------------------------------------------------------

class Inits:
    """Runs blocking pair setups (`NcclCommunicator(...)` waits, with no deadline NCCL offers, for
    the peer to join) in a thread the caller stops waiting for at its deadline. A setup that
    finishes after that is handed to `on_late` (which closes it). Setups still blocked are
    counted; at `max_stuck` new ones are refused (each holds a thread and NCCL's bootstrap
    socket), so a peer that keeps vanishing costs bounded resources, not a hung transfer."""

    def __init__(self, max_stuck: int = MAX_STUCK_INITS) -> None:
        self.max_stuck = max_stuck
        self._lock = threading.Lock()
        self._stuck = 0

    @property
    def stuck(self) -> int:
        with self._lock:
            return self._stuck

    def check(self, what: str) -> None:
        """Refuse (PEER_ERROR) while `max_stuck` setups are blocked. Call it before telling a
        peer to join, so a refusal never leaves the peer joining alone."""
        with self._lock:
            if self._stuck >= self.max_stuck:
                raise KVTransferFailure(ErrorCode.PEER_ERROR,
                                        f"{what}: {self._stuck} earlier setups are still blocked "
                                        f"waiting for peers; refusing new ones")

    def run(self, setup: Callable[[], T], deadline_at: float, what: str,
            on_late: Callable[[T], None], check: Callable[[], None] | None = None) -> T:
        """`setup()` in a thread; its result, or its exception; TIMEOUT at the deadline, or
        what `check` (run every 50 ms: e.g. the peer gave up) raises, whichever is first."""
        box: list[Any] = []  # [ok, value or exception], set once under self._lock
        done = threading.Event()
        abandoned = False

        def body() -> None:
            try:
                out: list[Any] = [True, setup()]
            except BaseException as exc:  # reported to the caller, or dropped when late
                out = [False, exc]
            with self._lock:
                box.extend(out)
                late = abandoned
                if late:
                    self._stuck -= 1
            done.set()
            if late and not out[0]:
                log.warning("%s: a setup abandoned at its deadline failed later: %s", what,
                            out[1])
            elif late:
                try:
                    on_late(out[1])
                except Exception:
                    log.exception("%s: closing a late setup failed", what)

        threading.Thread(target=body, name=f"meshd-{what}", daemon=True).start()
        failure: KVTransferFailure | None = None
        while not done.wait(max(0.0, min(0.05, deadline_at - time.monotonic()))):
            if time.monotonic() >= deadline_at:
                failure = KVTransferFailure(ErrorCode.TIMEOUT, f"{what}: the peer did not "
                                            f"join before the deadline")
                break
            if check is not None:
                try:
                    check()
                except KVTransferFailure as exc:
                    failure = exc
                    break
        with self._lock:
            if not box:
                abandoned = True
                self._stuck += 1
                log.warning("%s: gave up (%s); %d setups still blocked (new ones are refused "
                            "at %d)", what, failure, self._stuck, self.max_stuck)
                raise failure or KVTransferFailure(ErrorCode.TIMEOUT, what)
        if not box[0]:
            raise box[1]
        return cast("T", box[1])


# --- one pair communicator -------------------------------------------------------------------

class PairComm:
    """A 2-rank NCCL communicator plus the lock that serializes its use and its own stream.

    Construction blocks: `NcclCommunicator(2, uid, rank)` waits until both ranks have called it
    (NCCL bootstrap over TCP to the uid's address), and a one-byte warm-up exchange makes NCCL
    connect the pair now (it connects lazily, inside the first `groupEnd`, which would block
    with no deadline); run it through `Inits.run`. After that `send`/`recv(ptr, count, datatype,
    peer, stream)` enqueue on `stream` and return at once; data is valid only when the stream's
    work completes (`wait`). The stream is a private non-blocking stream (`streams.
    private_stream`), not one of torch's pooled streams that vLLM also draws from, so nothing
    else is queued behind a stalled transfer (a device-wide sync elsewhere in the process, such
    as the allocator freeing cached memory, still waits for it until the abort)."""

    def __init__(self, nccl: Any, uid: bytes, rank: int, device: int,
                 deadline_at: float, also: Callable[[], None] | None = None) -> None:
        import cupy

        self.nccl, self.rank, self.device = nccl, rank, device
        self.lock = threading.Lock()
        self.stream = private_stream(device)
        try:
            with cupy.cuda.Device(device):
                self.comm = nccl.NcclCommunicator(2, cupy_uid(uid, cupy_major()), rank)
        except BaseException:
            release_stream(self.stream)
            raise
        try:
            (probe,) = step_buffers([(1,)], [_uint8()], device, self.stream)
            self.enqueue([probe], send=rank == 0)
            self.wait(deadline_at, "nccl pair warm-up", also)
        except BaseException:
            # never leave a half-built communicator to cupy's destroy()
            self.close(abort=True, settle_first=True)
            raise

    def enqueue(self, bufs: Sequence[torch.Tensor], send: bool) -> None:
        """Queue a send (rank 0) or receive (rank 1) of every buffer, as bytes, in one NCCL
        group on this pair's stream. On an error the group is closed, then the communicator
        aborted (aborting inside an open group would leave the group pointing at a freed comm)."""
        import cupy

        peer = 1 - self.rank
        try:
            with cupy.cuda.Device(self.device):
                self.nccl.groupStart()
                try:
                    for buf in bufs:
                        op = self.comm.send if send else self.comm.recv
                        op(buf.data_ptr(), buf.numel() * buf.element_size(),
                           self.nccl.NCCL_UINT8, peer, self.stream.cuda_stream)
                finally:
                    self.nccl.groupEnd()
        except BaseException:
            self.comm.abort()
            raise

    def check(self, also: Callable[[], None] | None = None) -> Callable[[], None]:
        """A poll check: `also`, then NCCL's asynchronous error state of this communicator."""

        def check() -> None:
            if also is not None:
                also()
            try:
                self.comm.check_async_error()
            except RuntimeError as exc:  # cupy's NcclError
                raise KVTransferFailure(ErrorCode.PEER_ERROR, f"nccl: {exc}") from exc

        return check

    def wait(self, deadline_at: float, what: str, also: Callable[[], None] | None = None
             ) -> None:
        """Until the work queued on the stream has finished; at the deadline (or when a check
        fails) abort the communicator (`close()` it after) and raise."""
        try:
            wait_stream(self.stream, deadline_at, what, self.check(also))
        except BaseException:
            self.comm.abort()
            raise

    def close(self, abort: bool = False, settle_first: bool = False) -> None:
        """Destroy the communicator (`abort` when the peer may be gone or mid-operation:
        `ncclCommDestroy` could wait for it; cupy's abort makes a later destroy a no-op) and
        give the stream back. `settle_first`: after aborting, let queued work finish
        (`streams.settle`); a stream whose work does not finish is never reused. Idempotent."""
        if self.stream is None:
            return
        if abort:
            self.comm.abort()
        else:
            self.comm.destroy()
        if not settle_first or settle(self.stream, "nccl pair close"):
            release_stream(self.stream)
        self.stream = None  # type: ignore[assignment]


def _uint8() -> torch.dtype:
    import torch

    return torch.uint8


def close_late(pc: PairComm) -> None:
    pc.close(abort=True)


def close_pairs(pairs: Sequence[tuple[PairComm, threading.Lock]], grace_s: float) -> None:
    """Shutdown: abort each pair once its lock is free (a transfer holds it at most until its
    deadline); one still busy after `grace_s` is left alone (aborting a communicator another
    thread is inside would free it under that thread)."""
    end = time.monotonic() + grace_s
    for pc, lock in pairs:
        if lock.acquire(timeout=max(0.0, end - time.monotonic())):
            try:
                pc.close(abort=True)
            finally:
                lock.release()
        else:
            log.warning("nccl: a pair still busy at close was left open")


def transfer(kv: GpuKV, pc: PairComm, block_ids: Sequence[int], step: int, send: bool,
              deadline: Deadline, also: Callable[[], None]) -> None:
    """Move `block_ids` in steps over `pc` (send: gather then send; receive: receive then
    scatter), at most `STEP_DEPTH` steps queued; every buffer is allocated before any NCCL work
    is queued. Returns when all of it has finished; raises (communicator aborted) on failure."""
    import torch

    what = "nccl send" if send else "nccl receive"
    steps = spans(len(block_ids), step)
    size = min(step, len(block_ids))  # a short fetch needs no full-size step buffers
    sets = [kv.step_buffers(size, pc.stream) for _ in steps[:STEP_DEPTH]]
    idx = kv.index_on(block_ids, pc.stream)
    window = StepWindow(pc.stream, depth=max(1, len(sets)))
    check = pc.check(also)
    try:
        for i, (a, b) in enumerate(steps):
            window.admit(deadline.at, what, check)
            bufs = kv.shaped(sets[i % len(sets)], b - a)
            if send:
                with torch.cuda.stream(pc.stream):
                    kv.gather(idx[a:b], out=bufs)
                pc.enqueue(bufs, send=True)
            else:
                pc.enqueue(bufs, send=False)
                with torch.cuda.stream(pc.stream):
                    kv.scatter(idx[a:b], bufs)
            window.record()
    except BaseException:
        pc.comm.abort()
        raise
    pc.wait(deadline.at, what, also)
