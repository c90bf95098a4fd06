"""The `meshd agent` daemon loop: register, heartbeat, re-attach, leave cleanly.

- Registers with its signed capability report (enrolling with a join token the first time: it
  sends the token's proof for its key, never the token, `meshd/enrollment.py`).
- Heartbeats every interval the coordinator asks for, carrying host and worker load.
- Coordinator unreachable (restart, network): retries with capped exponential backoff; the
  coordinator restores node records from its store, so heartbeats resume without operator
  action. Told `not_registered`: registers again.
- Refused for good (revoked or unknown key, used token): stops with `AgentRefused`.
- Told to change a worker's role (a heartbeat reply's `role_changes`): hands each new one to
  the supervisor (`rerole`: drain, restart in the role) and acknowledges it in the next
  heartbeat (`role_generation`); the drained worker leaves its next registration.
- On stop (SIGTERM): deregisters within a deadline, then returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from meshd import capabilities as caps
from meshd import enrollment
from meshd.config import AgentConfig
from meshd.node_agent.client import ControlClient, ControlError
from meshd.node_agent.identity import Identity
from meshd.proto.v1 import control_pb2 as pb

log = logging.getLogger("meshd.agent")
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED}
# Clock skew or a coordinator that restarted after we signed: sign again and retry.
_RETRY_REASONS = {"stale_timestamp"}


class AgentRefused(Exception):
    """The coordinator refused this agent for a reason that retrying cannot fix."""


@dataclass(slots=True)
class AgentStatus:
    node_id: str
    registered: bool = False
    registrations: int = 0
    heartbeats: int = 0
    last_error: str = ""


def host_load() -> tuple[float, int]:
    """(1-minute load average per CPU, available memory bytes)."""
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        load = 0.0
    avail = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in open("/proc/meminfo").read().splitlines():  # noqa: SIM115 - tiny file
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    return load, avail


class Agent:
    def __init__(self, config: AgentConfig, identity: Identity,
                 report: Callable[[], caps.Capabilities],
                 workers: Callable[[], tuple[caps.Worker, ...]] | None = None,
                 rerole: Callable[[str, str], bool] | None = None) -> None:
        """`report` is called at each registration; `workers` (the supervisor's ready workers)
        is checked every tick and a change re-registers with the new set; `rerole(worker_id,
        role)` starts a role change (None: this agent's supervisor cannot)."""
        self.config = config
        self.identity = identity
        self.report = report
        self.workers = workers
        self._registered_workers: tuple[caps.Worker, ...] | None = None
        self.client = ControlClient(config.coordinator, identity, config.rpc_timeout_s)
        self.status = AgentStatus(identity.node_id)
        self.interval_s = 2.0
        self._seq = 0
        self.rerole = rerole
        self.role_generation = 0  # the highest role change taken

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set; raises AgentRefused when the coordinator refuses us."""
        backoff = 0.2
        try:
            while not stop.is_set():
                try:
                    if not self.status.registered or self._workers_changed():
                        await self._register()
                    else:
                        await self._heartbeat()
                    backoff = 0.2
                    delay = self.interval_s
                except ControlError as e:
                    self.status.last_error = f"{e.code.name}: {e.detail}"
                    if e.reason == "not_registered":
                        self.status.registered = False
                        delay = 0.0
                    elif e.code in _RETRYABLE or e.reason in _RETRY_REASONS:
                        log.warning("coordinator %s: %s; retrying in %.1fs",
                                    self.config.coordinator, self.status.last_error, backoff)
                        delay, backoff = backoff, min(backoff * 2,
                                                      self.config.reconnect_max_backoff_s)
                    else:
                        raise AgentRefused(f"coordinator refused node {self.identity.node_id}: "
                                           f"{e.detail}") from None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        finally:
            if self.status.registered:
                await self._leave()
            await self.client.close()

    def _workers_changed(self) -> bool:
        return self.workers is not None and self.workers() != self._registered_workers

    async def _register(self) -> None:
        report = self.report()
        if self.workers is not None:
            ready = self.workers()
            ids = {w.worker_id for w in ready}
            report = dataclasses.replace(report, workers=ready, experts=tuple(
                e for e in report.experts if e.worker_id in ids))
        # the token's proof for this key, never the token (meshd/enrollment.py)
        token = enrollment.proof(self.config.join_token, self.identity.public_key)
        reply = await self.client.register(caps.to_pb(report), token)
        self._registered_workers = report.workers
        self.interval_s = reply.heartbeat_interval_s or self.interval_s
        self.status.registered = True
        self.status.registrations += 1
        log.info("registered as %s%s; heartbeat every %.1fs", reply.node_id,
                 " (enrolled with join token)" if reply.enrolled else "", self.interval_s)

    async def _heartbeat(self) -> None:
        self._seq += 1
        load, avail = host_load()
        reply = await self.client.heartbeat(pb.HeartbeatRequest(
            seq=self._seq, cpu_load=load, memory_available_bytes=avail,
            role_generation=self.role_generation))
        self.interval_s = reply.heartbeat_interval_s or self.interval_s
        self.status.heartbeats += 1
        for change in reply.role_changes:
            if change.generation <= self.role_generation:
                continue
            role = caps.role_name(change.role)
            started = (self.rerole is not None and role is not None
                       and self.rerole(change.worker_id, role))
            log.log(logging.INFO if started else logging.WARNING,
                    "role change %d: worker %s -> %s %s", change.generation, change.worker_id,
                    role, "started" if started else "not possible here (dropped)")
            self.role_generation = change.generation

    async def _leave(self) -> None:
        t0 = time.monotonic()
        try:
            await self.client.deregister("agent stopping", timeout_s=2.0)
            log.info("deregistered in %.0f ms", (time.monotonic() - t0) * 1000)
        except ControlError as e:
            log.warning("deregister failed (%s); the coordinator will mark this node dead",
                        e.detail)
        self.status.registered = False
