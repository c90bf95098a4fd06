"""Role changes asked of the agents (the P/D planner's actuator), as plain data.

An operator (`meshd role set`) or the planner asks that a worker take another role; the ask
waits here, per node, with a generation that increases per node, until the node's agent
acknowledges it in a heartbeat (`role_generation`). From the ask on, the worker is out of the
routing set (`draining`): the gateways stop sending it new requests at their next membership
refresh, while the agent lets the running ones finish, restarts the worker in the new role and
reports it again (under a new worker id, so no gateway keeps the old role's cache view).
An ask no agent takes within `max_age_s` (an agent too old to know role changes, or one that
is gone without leaving) is dropped by `expire`, and the worker is routed to again.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RoleAsk:
    worker_id: str
    role: str  # prefill | decode | both
    generation: int
    asked_at: float = 0.0  # the coordinator's clock when it was asked


class RoleBook:
    def __init__(self) -> None:
        self._pending: dict[str, list[RoleAsk]] = {}  # node id -> asks not yet taken
        self._generation: dict[str, int] = {}  # node id -> the last generation given

    def ask(self, node_id: str, worker_id: str, role: str, now: float = 0.0) -> RoleAsk:
        """A new ask (ValueError if the worker has one pending already)."""
        if worker_id in self.draining(node_id):
            raise ValueError(f"worker {worker_id} has a role change pending already")
        gen = self._generation.get(node_id, 0) + 1
        self._generation[node_id] = gen
        ask = RoleAsk(worker_id, role, gen, now)
        self._pending.setdefault(node_id, []).append(ask)
        return ask

    def pending(self, node_id: str) -> list[RoleAsk]:
        return list(self._pending.get(node_id, ()))

    def draining(self, node_id: str) -> set[str]:
        """The workers of `node_id` with an ask not yet taken."""
        return {a.worker_id for a in self._pending.get(node_id, ())}

    def ack(self, node_id: str, generation: int) -> None:
        """The agent took every ask up to `generation`."""
        left = [a for a in self._pending.get(node_id, ()) if a.generation > generation]
        if left:
            self._pending[node_id] = left
        else:
            self._pending.pop(node_id, None)

    def expire(self, now: float, max_age_s: float) -> list[tuple[str, RoleAsk]]:
        """Drop the asks older than `max_age_s`; returns them with their node ids."""
        dropped: list[tuple[str, RoleAsk]] = []
        for node_id in list(self._pending):
            keep = []
            for a in self._pending[node_id]:
                if now - a.asked_at < max_age_s:
                    keep.append(a)
                else:
                    dropped.append((node_id, a))
            if keep:
                self._pending[node_id] = keep
            else:
                del self._pending[node_id]
        return dropped

    def forget(self, node_id: str) -> None:
        """The node left: its asks go (a node that comes back starts without any)."""
        self._pending.pop(node_id, None)

    def check_integrity(self) -> None:
        for node_id, asks in self._pending.items():
            gens = [a.generation for a in asks]
            assert gens == sorted(gens) and len(set(gens)) == len(gens), node_id
            assert gens[-1] <= self._generation[node_id], node_id
            assert len({a.worker_id for a in asks}) == len(asks), node_id
