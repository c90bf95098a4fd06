"""The one builder of `WorkerView`s, shared by the live gateway and the simulator.

A view is two typed parts put together:

* `WorkerFacts`: what changes only with membership or configuration — identity, role, model,
  node, KV block size and capacity, the MoE experts the worker hosts, the node's attributes
  and the SLO scorer's cost parameters;
* `LoadSample`: what every scrape (or simulated instant) changes — running and waiting
  requests, queued prefill tokens, KV usage, health.

`build_view(facts, load)` is the only place a `WorkerView` is assembled from them, so a field
added to `WorkerView` must be added here, and the test beside this module (every field covered
by exactly one part) fails until it is. Pure data, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from meshd.scheduler.types import Role, WorkerView


@dataclass(frozen=True, slots=True)
class WorkerFacts:
    """The static part of a worker's view. `experts` empty: hosts all experts (or not MoE);
    `cost` empty: the cost model's defaults. Mappings are shared, never mutated."""

    worker_id: str
    role: Role
    model: str
    node_id: str = ""
    block_size: int = 16
    kv_capacity_blocks: int = 0
    experts: frozenset[int] = frozenset()
    attributes: Mapping[str, str] = field(default_factory=dict)
    cost: Mapping[str, float] = field(default_factory=dict)


class LoadSample(NamedTuple):
    """The dynamic part: one reading of the worker's load. `num_waiting_tokens` is the prefill
    work queued, in prompt tokens (0: none or unknown); `kv_usage` in 0..1."""

    num_running: int = 0
    num_waiting: int = 0
    num_waiting_tokens: int = 0
    kv_usage: float = 0.0
    healthy: bool = True


IDLE = LoadSample()


def build_view(facts: WorkerFacts, load: LoadSample = IDLE) -> WorkerView:
    """The `WorkerView` of `facts` under `load` (a new object: views are immutable)."""
    return WorkerView(
        worker_id=facts.worker_id, role=facts.role, model=facts.model, healthy=load.healthy,
        num_running=load.num_running, num_waiting=load.num_waiting, kv_usage=load.kv_usage,
        kv_capacity_blocks=facts.kv_capacity_blocks, block_size=facts.block_size,
        node_id=facts.node_id, attributes=facts.attributes, experts=facts.experts,
        cost=facts.cost, num_waiting_tokens=load.num_waiting_tokens)


def hosted_experts(layers: Iterable[Iterable[int]]) -> frozenset[int]:
    """The experts a worker hosts, as the one set the expert-affinity scorer reads, from its
    per-layer placement: those it hosts in every layer (as `ExpertPlacement.worker_experts`);
    when no expert is in every layer, those it hosts in any (empty would mean "all").
    No layers: empty (hosts all, or not MoE)."""
    every: frozenset[int] | None = None
    some: frozenset[int] = frozenset()
    for layer in layers:
        experts = frozenset(int(e) for e in layer)
        every = experts if every is None else every & experts
        some |= experts
    return every or some

