"""Worker process supervision: start, health-check, restart with backoff, capture logs, stop.

A `WorkerSpec` says how to run one worker (the embedded engine's `meshd engine serve ...` or
`vllm serve ...`) and where its health endpoint is. `Supervisor` runs each spec as a child
process in its own process group, polls `GET <health_url>` until ready (deadline), restarts it
with capped exponential backoff when it exits or stops answering, and on `stop()` sends SIGTERM
to the group, then SIGKILL after a grace period. Output goes to `<log_dir>/<worker_id>.log`.

`rerole(worker_id, role)` changes a worker's role at runtime (the coordinator asks, the agent
calls it): the worker is drained — it leaves `ready_workers` at once, so the agent's next
registration takes it out of the routing set — until its own `/metrics` show nothing running,
waiting or leased (KV blocks a decode worker has yet to pull) for `_IDLE_POLLS` polls in a
row; then it is restarted with the new role's spec (`respec`) under a new worker id. A worker
that does not drain within `drain_timeout_s` keeps its role and is served again: a role change
never ends a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from meshd.capabilities import Worker

log = logging.getLogger("meshd.agent.supervisor")


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    worker: Worker  # what the agent reports once the worker is ready
    argv: tuple[str, ...]
    health_url: str
    env: Mapping[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 180.0
    health_interval_s: float = 2.0
    max_backoff_s: float = 30.0
    metrics_url: str = ""  # the worker's /metrics (what a drain watches); "" = health's host
    drain_timeout_s: float = 120.0


class WorkerSupervisor(Protocol):
    """What the agent needs from a supervisor: `Supervisor` (child processes of the agent) or
    `ray_host.RaySupervisor` (the same, inside a Ray actor on the agent's node)."""

    def ready_workers(self) -> tuple[Worker, ...]: ...

    def all_ready(self) -> bool: ...

    def describe(self) -> list[dict[str, Any]]: ...

    async def start(self) -> None: ...

    async def wait_ready(self, timeout_s: float) -> bool: ...

    async def stop(self, grace_s: float = 10.0) -> None: ...


@dataclass(slots=True)
class WorkerState:
    spec: WorkerSpec
    proc: asyncio.subprocess.Process | None = None
    ready: bool = False
    restarts: int = 0
    started_at: float = 0.0
    last_exit: int | None = None
    log_file: IO[bytes] | None = None
    draining: bool = False  # a role change waits for it to finish its requests
    role_changes: int = 0


_PR_SET_PDEATHSIG = 1


@functools.cache
def _die_with_parent() -> Callable[[], None] | None:
    """For the child, before exec (Linux): get SIGTERM when the supervising thread's process
    dies, so a crashed agent (or a killed Ray worker-host actor) does not leave its workers
    running and holding their ports. prctl is looked up here, in the parent: the child only
    calls it (nothing that could take a lock between fork and exec)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_pdeathsig() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return set_pdeathsig


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _healthy(url: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return bool(200 <= r.status < 300)
    except (urllib.error.URLError, OSError, ValueError):
        return False


_IDLE_POLLS = 3  # consecutive idle /metrics polls before a drained worker restarts
_IDLE_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting",
                "meshd_engine_kv_leased_blocks")
# the respec of a worker for a new role (launcher.respec); None when its engine cannot
Respec = Callable[[WorkerSpec, str], WorkerSpec | None]


def _busy(url: str, timeout_s: float) -> float | None:
    """Requests running + waiting + KV blocks leased, from the worker's /metrics (None: no
    answer)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            text = r.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None
    total = 0.0
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in _IDLE_GAUGES:
            with contextlib.suppress(ValueError, IndexError):
                total += float(line.rsplit(" ", 1)[1])
    return total


class Supervisor:
    def __init__(self, specs: Sequence[WorkerSpec], log_dir: str | Path,
                 respec: Respec | None = None, settle_s: float = 2.0,
                 poll_s: float = 0.5) -> None:
        """`respec`: how a worker's spec looks in another role (None: no role changes);
        `settle_s`: how long a drained worker waits before its first idle poll (the gateways'
        membership refresh must have taken it out of their routing sets)."""
        self.states = {s.worker.worker_id: WorkerState(s) for s in specs}
        self.log_dir = Path(log_dir).expanduser()
        self._respec = respec
        self._settle_s, self._poll_s = settle_s, poll_s
        self._tasks: list[asyncio.Task[None]] = []
        self._keepers: dict[str, asyncio.Task[None]] = {}
        self._stopping = False

    def ready_workers(self) -> tuple[Worker, ...]:
        return tuple(st.spec.worker for st in self.states.values()
                     if st.ready and not st.draining)

    def all_ready(self) -> bool:
        return all(st.ready for st in self.states.values())

    async def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._keepers = {wid: asyncio.create_task(self._keep(st))
                         for wid, st in self.states.items()}

    def rerole(self, worker_id: str, role: str) -> bool:
        """Start changing `worker_id`'s role (drain, then restart); False when it cannot be
        (unknown worker, a change under way, its engine cannot, the same role)."""
        st = self.states.get(worker_id)
        if st is None or st.draining or self._respec is None or st.spec.worker.role == role:
            return False
        new = self._respec(st.spec, role)
        if new is None:
            return False
        st.draining = True
        self._tasks.append(asyncio.create_task(self._rerole(st, new)))
        return True

    async def _rerole(self, st: WorkerState, new: WorkerSpec) -> None:
        old = st.spec.worker.worker_id
        url = st.spec.metrics_url or st.spec.health_url.rsplit("/", 1)[0] + "/metrics"
        log.info("worker %s: draining for role %s", old, new.worker.role)
        if not await self._drained(url, st.spec.drain_timeout_s):
            st.draining = False
            log.warning("worker %s still busy after %.0fs: keeps role %s and is served again",
                        old, st.spec.drain_timeout_s, st.spec.worker.role)
            return
        keeper = self._keepers.pop(old, None)
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        await self._terminate(st, 10.0)
        if st.log_file is not None:
            st.log_file.close()
            st.log_file = None
        if self._stopping:
            return
        del self.states[old]
        nid = new.worker.worker_id
        st.spec, st.ready, st.draining, st.proc = new, False, False, None
        st.role_changes += 1
        self.states[nid] = st
        self._keepers[nid] = asyncio.create_task(self._keep(st))
        log.info("worker %s restarted as %s (role %s)", old, nid, new.worker.role)

    async def _drained(self, url: str, timeout_s: float) -> bool:
        """Nothing running, waiting or leased for `_IDLE_POLLS` polls in a row, in time."""
        deadline = time.monotonic() + timeout_s
        await asyncio.sleep(self._settle_s)
        idle = 0
        while time.monotonic() < deadline:
            busy = await asyncio.to_thread(_busy, url, 2.0)
            idle = idle + 1 if busy == 0 else 0
            if idle >= _IDLE_POLLS:
                return True
            await asyncio.sleep(self._poll_s)
        return False

    async def wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.all_ready():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.2)
        return True

    async def stop(self, grace_s: float = 10.0) -> None:
        self._stopping = True
        tasks = [*self._tasks, *self._keepers.values()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await asyncio.gather(*(self._terminate(st, grace_s) for st in self.states.values()))
        for st in self.states.values():
            if st.log_file is not None:
                st.log_file.close()
                st.log_file = None

    async def _spawn(self, st: WorkerState) -> None:
        spec = st.spec
        if st.log_file is None:
            st.log_file = open(self.log_dir / f"{spec.worker.worker_id}.log", "ab")  # noqa: SIM115
        st.proc = await asyncio.create_subprocess_exec(
            *spec.argv, stdout=st.log_file, stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL, env={**os.environ, **spec.env},
            start_new_session=True, preexec_fn=_die_with_parent())
        st.started_at = time.monotonic()
        st.ready = False
        log.info("worker %s started (pid %d): %s", spec.worker.worker_id, st.proc.pid,
                 " ".join(spec.argv))

    async def _keep(self, st: WorkerState) -> None:
        """Run one worker forever: spawn, wait ready, watch; restart with backoff."""
        backoff = 1.0
        spec = st.spec
        while not self._stopping:
            await self._spawn(st)
            assert st.proc is not None
            failure = await self._watch(st)
            st.ready = False
            await self._terminate(st, 5.0)
            if self._stopping:
                return
            st.restarts += 1
            log.warning("worker %s %s; restarting in %.0fs (restart %d)",
                        spec.worker.worker_id, failure, backoff, st.restarts)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, spec.max_backoff_s)

    async def _watch(self, st: WorkerState) -> str:
        """Return why the worker must be restarted (it exited, never got ready, went unhealthy)."""
        spec, proc = st.spec, st.proc
        assert proc is not None
        misses = 0
        while True:
            try:
                code = await asyncio.wait_for(proc.wait(), spec.health_interval_s)
                st.last_exit = code
                return f"exited with code {code}"
            except TimeoutError:
                pass
            ok = await asyncio.to_thread(_healthy, spec.health_url, spec.health_interval_s)
            if ok:
                misses = 0
                if not st.ready:
                    st.ready = True
                    log.info("worker %s ready after %.1fs", spec.worker.worker_id,
                             time.monotonic() - st.started_at)
            elif not st.ready and time.monotonic() - st.started_at > spec.ready_timeout_s:
                return f"not ready after {spec.ready_timeout_s:.0f}s"
            elif st.ready:
                misses += 1
                if misses >= 3:
                    return "stopped answering its health check"

    async def _terminate(self, st: WorkerState, grace_s: float) -> None:
        proc = st.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
            # The leader is gone; its children (e.g. vLLM's engine core) may still hold ports.
            while _group_alive(proc.pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        except TimeoutError:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()

    def describe(self) -> list[dict[str, Any]]:
        return [{"worker_id": wid, "ready": st.ready, "restarts": st.restarts,
                 "pid": st.proc.pid if st.proc else None, "last_exit": st.last_exit,
                 "role": st.spec.worker.role, "draining": st.draining,
                 "role_changes": st.role_changes}
                for wid, st in self.states.items()]
