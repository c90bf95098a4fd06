"""Asyncio driver for the synchronous `Engine`: one step thread, per-request output queues.

Threads and locking — a lock, not a command queue:
- Every call into `Engine` holds `AsyncEngine.lock` (a `threading.Lock`). The step thread holds
  it for one `step()` plus the bookkeeping around it; transport threads (lease release from
  `BlockSource.on_sent`) and worker threads (`allocate_for_import`, `free_import`, debug
  snapshots) take it through `run_locked`. Lock order: the engine lock may be held while
  taking a component's own lock (leases), never the other way round.
- The asyncio loop never takes the engine lock. New requests and aborts go to the step thread
  through an inbox guarded by a `Condition` (held for microseconds); `call(fn)` runs
  `run_locked(fn)` on a worker thread and awaits it.
- Outputs return with one `loop.call_soon_threadsafe` per step into per-request asyncio queues.
- Idle: the step thread waits on the condition (timeout `tick_s`, for `housekeeping` such as
  lease expiry); it never spins.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, NamedTuple, TypeVar

from meshd.node_agent.engine.api import EngineRequest, EngineStats, RequestOutput
from meshd.node_agent.engine.engine import Engine
from meshd.node_agent.engine.events import KVEvent

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The step thread failed or was shut down; no more requests are served."""


class DriverStats(NamedTuple):
    """A consistent snapshot taken by the step thread after its last iteration."""

    engine: EngineStats
    free_blocks: int
    num_blocks: int
    requests: int  # accepted since start
    aborts: int  # aborted by a client (cancel, disconnect) or shutdown
    step_seconds: float  # total time inside Engine.step()


class Hooks(NamedTuple):
    """Callbacks the step thread runs while holding the engine lock (keep them cheap).

    `on_held(request_id, block_ids)`: a hold request finished by length and keeps its blocks.
    `on_aborted(request_id)`: the driver aborted the request (its held blocks are gone).
    `housekeeping(engine)`: every iteration, at least every `tick_s`.
    `on_kv_events(events)`: block events of one iteration, in order.
    """

    on_held: Callable[[str, tuple[int, ...]], None] | None = None
    on_aborted: Callable[[str], None] | None = None
    housekeeping: Callable[[Engine], None] | None = None
    on_kv_events: Callable[[list[KVEvent]], None] | None = None


class AsyncEngine:
    """Drives one `Engine` from a dedicated thread; `generate` is the asyncio face of it."""

    def __init__(self, engine: Engine, hooks: Hooks | None = None, tick_s: float = 0.1) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self._hooks = hooks or Hooks()
        self._tick_s = tick_s
        self._cond = threading.Condition()
        self._inbox: list[tuple[str, Any, bool]] = []  # ("add", req, imported) | ("abort", id)
        self._queues: dict[str, asyncio.Queue[RequestOutput | Exception]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.dead: BaseException | None = None
        self._counts = {"requests": 0, "aborts": 0}
        self._step_s = 0.0
        self.stats = self._snapshot()
        self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        """Abort what is in flight, stop the step thread and fail waiting generators."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join, timeout_s)
        self._fail_all(EngineDeadError("engine shut down"))

    # -- any thread ---------------------------------------------------------------------------
    def run_locked(self, fn: Callable[[Engine], T]) -> T:
        """Run `fn(engine)` holding the engine lock. Not from the asyncio loop (it may wait for
        a whole step): use `call` there."""
        with self.lock:
            return fn(self.engine)

    def abort(self, request_id: str) -> None:
        """Ask the step thread to abort `request_id` (no-op if unknown). Thread-safe."""
        self._submit(("abort", request_id, False))

    # -- asyncio --------------------------------------------------------------------------------
    async def call(self, fn: Callable[[Engine], T]) -> T:
        """`run_locked(fn)` on a worker thread."""
        return await asyncio.to_thread(self.run_locked, fn)

    async def generate(self, request: EngineRequest,
                       imported: bool = False) -> AsyncGenerator[RequestOutput, None]:
        """Outputs of `request` until the finished one. Raises ValueError if the engine refuses
        the request, EngineDeadError if the engine stops. Closing or cancelling the iterator
        before the end aborts the request (use `contextlib.aclosing`)."""
        if self.dead is not None or self._stopping:
            raise EngineDeadError("engine is not running")
        rid = request.request_id
        if rid in self._queues:
            raise ValueError(f"request_id {rid!r} is already in use")
        queue: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        self._queues[rid] = queue
        self._submit(("add", request, imported))
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    finished = True  # never added, or the engine died
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished:
                self.abort(rid)

    # -- step thread ----------------------------------------------------------------------------
    def _submit(self, cmd: tuple[str, Any, bool]) -> None:
        with self._cond:
            self._inbox.append(cmd)
            self._cond.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if not (self._inbox or self._stopping or self.engine.has_unfinished()):
                        self._cond.wait(self._tick_s)
                    inbox, self._inbox = self._inbox, []
                    stopping = self._stopping
                outputs, failed = self._iterate(inbox, stopping)
                if (outputs or failed) and self._loop is not None:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs, failed)
                if stopping:
                    return
        except BaseException as exc:  # the engine is in an unknown state: stop serving
            log.exception("engine step thread failed")
            self.dead = exc
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError(str(exc)))

    def _iterate(self, inbox: list[tuple[str, Any, bool]], stopping: bool
                 ) -> tuple[list[RequestOutput], list[tuple[str, Exception]]]:
        failed: list[tuple[str, Exception]] = []
        outputs: list[RequestOutput] = []
        h = self._hooks
        with self.lock:
            for kind, arg, imported in inbox:
                if kind == "add":
                    self._add(arg, imported, failed)
                else:
                    self._abort_locked(arg)
            if stopping:
                for rid in list(self._queues):
                    self._abort_locked(rid)
            if self.engine.has_unfinished():
                t0 = time.perf_counter()
                outputs = self.engine.step()
                self._step_s += time.perf_counter() - t0
                for out in outputs:
                    if out.held_block_ids is not None and h.on_held is not None:
                        h.on_held(out.request_id, out.held_block_ids)
            if h.housekeeping is not None:
                h.housekeeping(self.engine)
            if h.on_kv_events is not None:
                events = self.engine.take_kv_events()
                if events:
                    h.on_kv_events(events)
            self.stats = self._snapshot()
        return outputs, failed

    def _add(self, req: EngineRequest, imported: bool,
             failed: list[tuple[str, Exception]]) -> None:
        try:
            self.engine.add_request(req, imported=imported)
            self._counts["requests"] += 1
        except ValueError as exc:
            if imported:
                self.engine.free_import(req.request_id)
            failed.append((req.request_id, exc))

    def _abort_locked(self, request_id: str) -> None:
        if self.engine.abort(request_id):
            self._counts["aborts"] += 1
            if self._hooks.on_aborted is not None:
                self._hooks.on_aborted(request_id)

    def _snapshot(self) -> DriverStats:
        e = self.engine
        return DriverStats(e.stats(), e.blocks.num_free_blocks, e.config.num_blocks,
                           self._counts["requests"], self._counts["aborts"], self._step_s)

    # -- loop thread ----------------------------------------------------------------------------
    def _dispatch(self, outputs: list[RequestOutput], failed: list[tuple[str, Exception]]) -> None:
        for rid, exc in failed:
            q = self._queues.get(rid)
            if q is not None:
                q.put_nowait(exc)
        for out in outputs:
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    def _fail_all(self, exc: Exception) -> None:
        for q in self._queues.values():
            q.put_nowait(exc)
