"""A replica's figures for the Ray dashboard, read from its state: in flight, connections,
workers by health, requests by outcome, TTFT quantiles and the prefix hit rate over the window
(the older readings fall out of it)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from meshd.coordinator.gateway.ray_figures import GATEWAY_SPECS, GatewayFigures
from meshd.coordinator.gateway.serving.request_metrics import MeshMetrics
from meshd.coordinator.gateway.workers.load import WorkerLoad
from meshd.coordinator.ray_metrics import RayMetricsBridge


def make_runtime(loads: list[tuple[bool, float, float]]) -> Any:
    """A runtime with the attributes the reader uses: (healthy, hits, queries) per worker."""
    entries = {f"w{i}": SimpleNamespace(healthy=h, load=WorkerLoad(prefix_hits=hits,
                                                                    prefix_queries=q))
               for i, (h, hits, q) in enumerate(loads)}
    return SimpleNamespace(metrics=MeshMetrics(), pool=SimpleNamespace(entries=entries),
                           handler=SimpleNamespace(inflight=3),
                           server=SimpleNamespace(stats=SimpleNamespace(connections=5)))


def figures_of(samples: list[Any]) -> dict[tuple[str, tuple[str, ...]], float]:
    return {(s.name, s.tags): s.value for s in samples}


def test_the_figures_read_the_replica() -> None:
    now = [0.0]
    rt = make_runtime([(True, 30.0, 100.0), (False, 10.0, 100.0)])
    rt.metrics.requests.inc("ok", 7)
    rt.metrics.requests.inc("error")
    for ttft in (0.02, 0.03, 0.2, 0.3):
        rt.metrics.ttft.observe(ttft)
    read = GatewayFigures(rt, window_s=60.0, clock=lambda: now[0])
    got = figures_of(read())
    assert got == {
        ("meshd_gateway_in_flight", ()): 3, ("meshd_gateway_connections", ()): 5,
        ("meshd_gateway_workers", ("healthy",)): 1, ("meshd_gateway_workers", ("unhealthy",)): 1,
        ("meshd_requests", ("error",)): 1.0, ("meshd_requests", ("ok",)): 7.0,
        ("meshd_gateway_ttft_p50_seconds", ()): pytest.approx(0.05),  # (0.025, 0.05] bucket
        ("meshd_gateway_ttft_p95_seconds", ()): pytest.approx(0.45),  # 0.8 into (0.25, 0.5]
        ("meshd_gateway_prefix_hit_rate", ()): pytest.approx(0.2)}

    now[0] = 90.0  # the first reading is outside the window now, the second becomes the base
    read()
    now[0] = 100.0
    rt.metrics.ttft.observe(2.0)
    rt.pool.entries["w0"].load = WorkerLoad(prefix_hits=80.0, prefix_queries=150.0)
    got = figures_of(read())
    assert got["meshd_gateway_ttft_p50_seconds", ()] == pytest.approx(1.75)  # only the new one
    assert got["meshd_gateway_prefix_hit_rate", ()] == pytest.approx(1.0)  # 50 of 50

    now[0] = 200.0  # nothing new in the window: zeros, not stale figures
    read()
    got = figures_of(read())
    assert got["meshd_gateway_ttft_p50_seconds", ()] == 0.0
    assert got["meshd_gateway_prefix_hit_rate", ()] == 0.0


def test_a_worker_restart_is_no_negative_rate() -> None:
    rt = make_runtime([(True, 50.0, 100.0)])
    read = GatewayFigures(rt)
    read()
    rt.pool.entries["w0"].load = WorkerLoad(prefix_hits=1.0, prefix_queries=120.0)
    assert figures_of(read())["meshd_gateway_prefix_hit_rate", ()] == 0.0


def test_every_figure_has_a_spec() -> None:
    rt = make_runtime([(True, 1.0, 2.0)])
    rt.metrics.requests.inc("ok")
    bridge = RayMetricsBridge("meshd-gateway-0", GATEWAY_SPECS, GatewayFigures(rt),
                              factory=lambda s: SimpleNamespace(set=lambda *a, **k: None,
                                                                inc=lambda *a, **k: None))
    assert bridge.copy() == 8 and bridge.skipped == 0
