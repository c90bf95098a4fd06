"""What admission reads of one tenant on every request, derived once per policy.

A `TenantPlan` holds the tenant's policy and what the request path would otherwise work out
from it per request: the allowed models, the `max_tokens` cap, the fair-share class and
weight, the loop breaker's action, the tenant's `MeterSet` and the `Bound` of the current
windows with the response's header templates. `Governor.apply` drops every plan (a reload
builds new ones); `rebind(...)` renews the meters when one of their windows turns over.
"""

from __future__ import annotations

from meshd.coordinator.gateway.governance.config import TenantPolicy
from meshd.coordinator.gateway.governance.meters import Bound, MeterSet, bind

# x-meshd-completion-estimate: what the reservation assumed of the completion's length
ESTIMATE_MAX_TOKENS = b"x-meshd-completion-estimate: max_tokens\r\n"
ESTIMATE_FMT = b"x-meshd-completion-estimate: %b;tokens=%d\r\n"


class TenantPlan:
    """One tenant's admission constants and meters. `head_max` / `head_est`: the response's
    header lines (the completion estimate, then x-ratelimit-*) as %-templates over
    `bound.rate_values(wall)` (`head_est` first takes the estimate's source and tokens)."""

    __slots__ = ("bound", "cap", "head_est", "head_max", "loop_action", "meters", "models",
                 "policy", "priority", "tenant", "until", "weight")

    def __init__(self, tenant: str, policy: TenantPolicy, meters: MeterSet, fleet: MeterSet,
                 max_tokens: int, loop_action: str, wall: float) -> None:
        self.tenant, self.policy, self.meters = tenant, policy, meters
        self.models = frozenset(policy.models)  # empty: every model
        self.cap = policy.max_tokens or max_tokens  # gateway.limits.max_tokens without one
        self.priority, self.weight = policy.priority_class, policy.weight
        self.loop_action = policy.loop_action or loop_action
        self._use(bind(meters, fleet, wall))

    def rebind(self, fleet: MeterSet, wall: float) -> None:
        """A window turned over: the meters of the windows `wall` falls in (the last bound's
        pool is retired: its running requests settle on it)."""
        self.bound.pool.retired = True
        self._use(bind(self.meters, fleet, wall))

    def _use(self, b: Bound) -> None:
        self.bound, self.until = b, b.until
        self.head_max = ESTIMATE_MAX_TOKENS + b.rate_fmt
        self.head_est = ESTIMATE_FMT + b.rate_fmt
