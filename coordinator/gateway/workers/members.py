"""From a routing-set member (`meshd.capabilities.Member`) to the scheduler's `WorkerFacts`.

The static half of every live `WorkerView` is made here: the worker's identity, role, model and
KV shape from its report, its node and the node's attributes, the experts it hosts (its
per-layer placement folded by `scheduler.views.hosted_experts`) and the cost-model parameters
(`[gateway.routing] cost`, then what calibration measured). Pure.
"""

from __future__ import annotations

from collections.abc import Mapping

from meshd.capabilities import Member
from meshd.coordinator.gateway.config import RoutingConfig
from meshd.scheduler.types import Role
from meshd.scheduler.views import WorkerFacts, hosted_experts


def configured_cost(routing: RoutingConfig, model: str) -> dict[str, float]:
    """`[gateway.routing] cost` for `model` (or its "*" entry); empty: the model's defaults."""
    params = routing.cost.get(model) or routing.cost.get("*") or {}
    return {str(k): float(v) for k, v in params.items()}


def facts_of(m: Member, cost: Mapping[str, float]) -> WorkerFacts:
    """The static facts of `m`'s worker, with `cost` as its cost parameters (shared as is)."""
    w = m.worker
    layers = [e.experts for e in m.experts
              if e.worker_id == w.worker_id and e.model in ("", w.model)]
    return WorkerFacts(worker_id=w.worker_id, role=Role(w.role), model=w.model,
                       node_id=m.node_id, block_size=w.kv_block_size or 16,
                       kv_capacity_blocks=w.kv_capacity_blocks, experts=hosted_experts(layers),
                       attributes=m.attributes, cost=cost)
