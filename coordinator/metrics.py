"""Control-plane metrics: Prometheus (`/metrics` on the registry) and the Ray dashboard.

Each figure is recorded once through `ControlMetrics`, which writes to a private Prometheus
registry and, when running inside a Ray actor, mirrors it through `ray.util.metrics` so the Ray
dashboard (and Ray's Prometheus export) shows the same numbers.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from meshd.coordinator.nodes import STATES


class ControlMetrics:
    def __init__(self, ray_mirror: bool = False) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.nodes = Gauge("meshd_nodes", "Nodes by state", ["state"], registry=r)
        self.registrations = Counter("meshd_registrations", "Accepted registrations",
                                     ["kind"], registry=r)
        self.rejections = Counter("meshd_rejections", "Rejected control-plane requests",
                                  ["reason", "method"], registry=r)
        self.heartbeats = Counter("meshd_heartbeats", "Verified heartbeats", registry=r)
        self.heartbeat_lag = Histogram(
            "meshd_heartbeat_lag_seconds", "Coordinator receive time minus agent send time",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5), registry=r)
        self.handle_seconds = Histogram(
            "meshd_control_handle_seconds", "Time to verify and handle a control request",
            ["method"], buckets=(5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.02, 0.1), registry=r)
        self._ray: dict[str, Any] = {}
        if ray_mirror:
            from ray.util import metrics as rm

            self._ray = {
                "nodes": rm.Gauge("meshd_nodes", "Nodes by state", tag_keys=("state",)),
                "registrations": rm.Counter("meshd_registrations", "Accepted registrations",
                                            tag_keys=("kind",)),
                "rejections": rm.Counter("meshd_rejections", "Rejected control requests",
                                         tag_keys=("reason", "method")),
                "heartbeats": rm.Counter("meshd_heartbeats", "Verified heartbeats"),
                "heartbeat_lag": rm.Histogram("meshd_heartbeat_lag_seconds",
                                              "Heartbeat lag",
                                              boundaries=[0.001, 0.01, 0.1, 1, 5]),
            }

    def set_node_counts(self, counts: dict[str, int]) -> None:
        for state in STATES:
            self.nodes.labels(state).set(counts.get(state, 0))
            if self._ray:
                self._ray["nodes"].set(counts.get(state, 0), tags={"state": state})

    def registered(self, kind: str) -> None:
        self.registrations.labels(kind).inc()
        if self._ray:
            self._ray["registrations"].inc(tags={"kind": kind})

    def rejected(self, reason: str, method: str) -> None:
        self.rejections.labels(reason, method).inc()
        if self._ray:
            self._ray["rejections"].inc(tags={"reason": reason, "method": method})

    def heartbeat(self, lag_s: float) -> None:
        self.heartbeats.inc()
        self.heartbeat_lag.observe(max(lag_s, 0.0))
        if self._ray:
            self._ray["heartbeats"].inc()
            self._ray["heartbeat_lag"].observe(max(lag_s, 0.0))
