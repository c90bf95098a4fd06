"""What the registry and ledger actors export through the Ray metrics bridge (`ray_metrics.py`).

Each reader is a pure function of in-memory state (no I/O): the registry's is called on its
event loop, the ledger's in its one call thread. The gateway's are in `gateway/ray_figures.py`.
The registry's node counts by state (`meshd_nodes`) and its counters are recorded by
`ControlMetrics` as they change; the bridge adds the worker counts.
"""

from __future__ import annotations

from collections.abc import Mapping

from meshd.capabilities import ROLES
from meshd.coordinator.nodes import ALIVE, NodeTable
from meshd.coordinator.ray_metrics import Sample, Spec

REGISTRY_SPECS = (
    Spec("meshd_workers", "Workers of alive nodes by role (the routing set before the "
         "trust store's revocations are applied)", "gauge", ("role",)),
)

LEDGER_SPECS = (
    Spec("meshd_fleet_ledger_replicas", "Gateway replicas holding leases on the fleet ledger"),
    Spec("meshd_fleet_ledger_meters", "Meters (one limit of a tenant) the fleet ledger keeps"),
    Spec("meshd_fleet_ledger_syncs", "Syncs the fleet ledger applied", "counter"),
    Spec("meshd_fleet_ledger_save_failures", "Fleet ledger saves that failed (retried)",
         "counter"),
    Spec("meshd_fleet_ledger_expired_replicas", "Replicas whose leases expired (the replica "
         "stopped syncing)", "counter"),
)


def registry_samples(table: NodeTable) -> list[Sample]:
    """Workers of alive nodes per role (every role, zeros included)."""
    counts = dict.fromkeys(ROLES, 0)
    for n in table.nodes.values():
        if n.state == ALIVE:
            for w in n.capabilities.workers:
                counts[w.role] = counts.get(w.role, 0) + 1
    return [Sample("meshd_workers", float(v), (role,)) for role, v in sorted(counts.items())]


def ledger_samples(stats: Mapping[str, int]) -> list[Sample]:
    """From `LocalLedger.stats()`."""
    return [Sample("meshd_fleet_ledger_replicas", stats["replicas"]),
            Sample("meshd_fleet_ledger_meters", stats["meters"]),
            Sample("meshd_fleet_ledger_syncs", stats["syncs"]),
            Sample("meshd_fleet_ledger_save_failures", stats["save_failures"]),
            Sample("meshd_fleet_ledger_expired_replicas", stats["expired_total"])]
