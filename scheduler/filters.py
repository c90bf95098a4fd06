"""Filters: drop workers that cannot serve a request. Each returns a new list, mutates nothing.

Each also gives `request_key`: its output depends on the request only through that key, so a
profile may reuse it while the worker views stay the same objects.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from meshd.scheduler.types import RequestView, Role, WorkerView


class HealthFilter:
    """Keeps healthy workers (heartbeat current, not draining)."""

    name = "health"

    def request_key(self, request: RequestView) -> Hashable:
        return None

    def filter(self, request: RequestView, workers: Sequence[WorkerView]) -> list[WorkerView]:
        return [w for w in workers if w.healthy]


class ModelFilter:
    """Keeps workers serving the request's model."""

    name = "model"

    def request_key(self, request: RequestView) -> Hashable:
        return request.model

    def filter(self, request: RequestView, workers: Sequence[WorkerView]) -> list[WorkerView]:
        model = request.model
        return [w for w in workers if w.model == model]


class RoleFilter:
    """Prefers workers that may do `role`'s phase: prefill (PREFILL, BOTH) or decode (DECODE,
    BOTH); `role="both"` prefers colocating workers.

    Roles are preferences, not capabilities: every worker engine can prefill and decode, so
    when no worker of the preferred kind passed the earlier filters (the decode worker died),
    all of them are kept and the request runs on whatever can serve the model. `strict=True`
    keeps only the role's workers (an empty result then means no worker).
    """

    name = "role"

    def __init__(self, role: str = "decode", strict: bool = False) -> None:
        try:
            self.role = Role(role)
        except ValueError:
            raise ValueError(f"role filter: role must be one of "
                             f"{[r.value for r in Role]}, got {role!r}") from None
        if not isinstance(strict, bool):
            raise ValueError(f"role filter: strict must be a boolean, got {strict!r}")
        self.strict = strict
        self.name = f"role-{self.role.value}"

    def request_key(self, request: RequestView) -> Hashable:
        return None

    def filter(self, request: RequestView, workers: Sequence[WorkerView]) -> list[WorkerView]:
        role = self.role
        if role is Role.BOTH:
            kept = [w for w in workers if w.role is role]
        else:
            excluded = Role.DECODE if role is Role.PREFILL else Role.PREFILL
            kept = [w for w in workers if w.role is not excluded]
        return kept if kept or self.strict else list(workers)
