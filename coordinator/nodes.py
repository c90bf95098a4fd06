"""Node liveness: the registry's in-memory table of nodes, as plain data with a passed-in clock.

States: alive -> suspect (no heartbeat for `suspect_after_s`) -> dead (`dead_after_s`); a
heartbeat from a suspect or dead node makes it alive again; `left` after a clean Deregister.
Only alive nodes' workers are routable. Heartbeat times are kept here and flushed to the store
in batches (`take_dirty`), so a heartbeat costs no disk write.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from meshd.capabilities import Capabilities

ALIVE, SUSPECT, DEAD, LEFT = "alive", "suspect", "dead", "left"
STATES = (ALIVE, SUSPECT, DEAD, LEFT)


@dataclass(slots=True)
class Node:
    node_id: str
    public_key: bytes
    capabilities: Capabilities
    registered_at: float
    last_heartbeat: float
    state: str = ALIVE
    heartbeat_seq: int = 0


@dataclass(frozen=True, slots=True)
class Transition:
    node_id: str
    old: str
    new: str


class NodeTable:
    def __init__(self, suspect_after_s: float, dead_after_s: float) -> None:
        assert dead_after_s > suspect_after_s > 0
        self.suspect_after_s = suspect_after_s
        self.dead_after_s = dead_after_s
        self.nodes: dict[str, Node] = {}
        self._dirty: set[str] = set()

    def restore(self, nodes: Iterable[Node], now: float) -> None:
        """Load persisted nodes after a restart, each in the state it had: an alive node gets
        a full suspect period from `now` to re-attach, a suspect one the rest of its way to
        dead; a dead or departed node stays so (a heartbeat brings a dead one back)."""
        for n in nodes:
            if n.state == ALIVE:
                n.last_heartbeat = max(n.last_heartbeat, now)
            elif n.state == SUSPECT:
                n.last_heartbeat = max(n.last_heartbeat, now - self.suspect_after_s)
            self.nodes[n.node_id] = n

    def register(self, node_id: str, public_key: bytes, caps: Capabilities, now: float) -> Node:
        node = Node(node_id, public_key, caps, registered_at=now, last_heartbeat=now)
        self.nodes[node_id] = node
        self._dirty.discard(node_id)  # the caller persists the full row
        return node

    def heartbeat(self, node_id: str, seq: int, now: float
                  ) -> Transition | None:
        """Record a heartbeat; KeyError for an unknown or departed node (it must register)."""
        node = self.nodes.get(node_id)
        if node is None or node.state == LEFT:
            raise KeyError(node_id)
        node.last_heartbeat = now
        node.heartbeat_seq = seq
        self._dirty.add(node_id)
        if node.state != ALIVE:
            old, node.state = node.state, ALIVE
            return Transition(node_id, old, ALIVE)
        return None

    def deregister(self, node_id: str) -> Transition | None:
        node = self.nodes.get(node_id)
        if node is None or node.state == LEFT:
            return None
        old, node.state = node.state, LEFT
        self._dirty.add(node_id)
        return Transition(node_id, old, LEFT)

    def tick(self, now: float) -> list[Transition]:
        """Advance liveness to `now`; returns the state changes made."""
        out = []
        for node in self.nodes.values():
            if node.state in (LEFT, DEAD):
                continue
            age = now - node.last_heartbeat
            new = DEAD if age >= self.dead_after_s else (
                SUSPECT if age >= self.suspect_after_s else ALIVE)
            if new != node.state:
                out.append(Transition(node.node_id, node.state, new))
                node.state = new
                self._dirty.add(node.node_id)
        return out

    def take_dirty(self) -> list[tuple[str, float, str]]:
        """(node_id, last_heartbeat, state) changed since the last call, for the store."""
        rows = [(nid, self.nodes[nid].last_heartbeat, self.nodes[nid].state)
                for nid in sorted(self._dirty) if nid in self.nodes]
        self._dirty.clear()
        return rows

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for n in self.nodes.values():
            out[n.state] += 1
        return out

    def check_integrity(self) -> None:
        for nid, n in self.nodes.items():
            assert nid == n.node_id, (nid, n.node_id)
            assert n.state in STATES, n.state
            assert n.heartbeat_seq >= 0, n.heartbeat_seq
