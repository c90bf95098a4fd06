"""CUDA stream discipline for the GPU transports: every wait polls against a deadline, queued
work is bounded, and nothing is reported finished while kernels may still write.

- `poll_event` / `wait_stream`: wait for queued work by polling a CUDA event (never a blocking
  `cudaStreamSynchronize`, which a stalled NCCL peer could hold forever); an optional `check`
  runs each round (the NCCL transport uses it to notice a peer that gave up or an NCCL error).
- `StepWindow`: at most `depth` transfer steps queued on a stream. A transfer queues its steps
  without host syncs; without a bound, a long prompt (hundreds of steps, a kernel per layer
  each) would fill CUDA's launch queue behind a stalled NCCL kernel and block the host inside a
  kernel launch, where no deadline reaches.
- `settle`: after a failure, let what is already queued finish (bounded) before the failure
  is reported, so a late scatter does not write blocks the engine has already given back.
- `private_stream` / `release_stream`: non-blocking streams of our own (cupy-created), reused
  through a free list and never destroyed: torch's allocator may record events on a stream
  after its user is gone, and torch's own `torch.cuda.Stream()` hands out streams from a shared
  pool that vLLM also uses.
- `step_buffers`: buffers allocated under one private allocation stream per device (no work is
  ever queued on it), marked used on the transfer's stream. torch's allocator reuses a freed
  block only on the stream it was allocated under and only after the marked stream's work has
  finished, so pairs share one pool instead of each keeping its own cached step memory.

Importing this module needs no torch; the stream functions need torch and cupy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SETTLE_S = 10.0  # after a failure: how long queued work may take to drain before we give up
_lock = threading.Lock()
_keep: list[Any] = []  # every cupy stream we made: kept alive, so never destroyed
_free: dict[int, list[torch.cuda.ExternalStream]] = {}
_pools: dict[int, torch.cuda.ExternalStream] = {}


def poll_event(event: Any, deadline_s: float, on_timeout: str,
               check: Callable[[], None] | None = None) -> None:
    """Until `event` (anything with `query() -> bool`) has completed; KVTransferFailure(TIMEOUT,
    on_timeout) past `deadline_s` (time.monotonic()). `check` runs each round and may raise."""
    from meshd.kv_transfer.transport import ErrorCode, KVTransferFailure

    pause = 20e-6
    while not event.query():
        if check is not None:
            check()
        if time.monotonic() > deadline_s:
            raise KVTransferFailure(ErrorCode.TIMEOUT, on_timeout)
        time.sleep(pause)
        pause = min(pause * 2, 1e-3)


def wait_stream(stream: torch.cuda.Stream, deadline_s: float, on_timeout: str,
                check: Callable[[], None] | None = None) -> None:
    """Until the work queued so far on `stream` has finished (see `poll_event`)."""
    import torch

    event = torch.cuda.Event()
    event.record(stream)
    poll_event(event, deadline_s, on_timeout, check)


def settle(stream: torch.cuda.Stream, what: str, grace_s: float = SETTLE_S) -> bool:
    """After a failed transfer (communicator already aborted): wait up to `grace_s` for the
    work queued on `stream` to finish. False, logged as an error, if it did not (its writes may
    still land later)."""
    from meshd.kv_transfer.transport import KVTransferFailure

    try:
        wait_stream(stream, time.monotonic() + grace_s, what)
    except KVTransferFailure:
        log.error("%s: queued GPU work did not finish %.0f s after the failure; the blocks "
                  "it writes may change later", what, grace_s)
        return False
    except Exception:  # a sticky CUDA error: nothing queued will run any more
        log.exception("%s: CUDA error while settling a failed transfer", what)
    return True


class StepWindow:
    """At most `depth` steps queued on one stream: `admit` before queuing a step (waits, against
    the deadline, for the step `depth` back to finish, so its buffers are free again), `record`
    after queuing it. `new_event` makes an event (default `torch.cuda.Event`)."""

    def __init__(self, stream: Any, depth: int = 2,
                 new_event: Callable[[], Any] | None = None) -> None:
        if depth < 1:
            raise ValueError(f"depth: must be >= 1, got {depth}")
        self.stream = stream
        self.depth = depth
        self._new_event = new_event
        self._events: deque[Any] = deque()

    def admit(self, deadline_s: float, on_timeout: str,
              check: Callable[[], None] | None = None) -> None:
        while len(self._events) >= self.depth:
            poll_event(self._events[0], deadline_s, on_timeout, check)
            self._events.popleft()

    def record(self) -> None:
        if self._new_event is None:
            import torch

            self._new_event = torch.cuda.Event
        event = self._new_event()
        event.record(self.stream)
        self._events.append(event)


def _new_stream(device: int) -> torch.cuda.ExternalStream:
    import cupy
    import torch

    with cupy.cuda.Device(device):
        cs = cupy.cuda.Stream(non_blocking=True)
    with _lock:
        _keep.append(cs)
    return torch.cuda.ExternalStream(cs.ptr, device=torch.device("cuda", device))


def private_stream(device: int) -> torch.cuda.ExternalStream:
    """A non-blocking stream of our own on GPU `device` (this process's index)."""
    with _lock:
        free = _free.get(device)
        if free:
            return free.pop()
    return _new_stream(device)


def release_stream(stream: torch.cuda.ExternalStream) -> None:
    """Give a `private_stream` back (work still queued on it is fine: a later user's work is
    ordered after it)."""
    index = stream.device.index
    assert index is not None
    with _lock:
        _free.setdefault(index, []).append(stream)


def pool_stream(device: int) -> torch.cuda.ExternalStream:
    """The allocation-key stream of GPU `device`: private, and no work is ever queued on it."""
    with _lock:
        stream = _pools.get(device)
    if stream is None:
        made = _new_stream(device)
        with _lock:
            stream = _pools.setdefault(device, made)
    return stream


def step_buffers(shapes: Sequence[tuple[int, ...]], dtypes: Sequence[torch.dtype],
                 device: int, used_on: torch.cuda.Stream) -> list[torch.Tensor]:
    """Uninitialized buffers on GPU `device` from its shared pool, for use on `used_on` only:
    once freed, they are reused only after the work queued on `used_on` so far has finished.
    Allocate them before queuing work that may stall: an allocation that finds the pool empty
    can make the allocator wait for the whole device."""
    import torch

    with torch.cuda.stream(pool_stream(device)):
        bufs = [torch.empty(s, dtype=d, device=torch.device("cuda", device))
                for s, d in zip(shapes, dtypes, strict=True)]
    for b in bufs:
        b.record_stream(used_on)
    return bufs
