"""What a gateway replica exports through the Ray metrics bridge (`coordinator/ray_metrics.py`).

`GatewayFigures(runtime)()` reads the replica's own state: call it on the replica's event loop
(the state is mutated there without locks), which the bridge's `run` task does. It reads plain
numbers only; no collector runs and no worker's metrics text is parsed:

- `meshd_gateway_in_flight`, `meshd_gateway_connections`: requests inside a handler and open
  client connections, now;
- `meshd_gateway_workers{health}`: the replica's pool, healthy and unhealthy;
- `meshd_requests{outcome}` (a counter): finished requests by outcome;
- `meshd_gateway_ttft_p50_seconds`, `..._p95_seconds`: time to first token over the last
  `window_s`, from the TTFT histogram's buckets (0 when no first token came in the window);
- `meshd_gateway_prefix_hit_rate`: prefix-cache hits over queries over the last `window_s`, as
  the workers report them (every replica sees the same workers; 0 with no queries, or when a
  worker's totals went back: it restarted or left).

The full set, with histograms, is on the replica's `/metrics` (docs/operations.md "Metrics").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from meshd.coordinator.ray_metrics import Sample, Spec, Window, quantile

if TYPE_CHECKING:
    from meshd.coordinator.gateway.runtime import GatewayRuntime

GATEWAY_SPECS = (
    Spec("meshd_gateway_in_flight", "Requests inside a handler of this replica"),
    Spec("meshd_gateway_connections", "Open client connections of this replica"),
    Spec("meshd_gateway_workers", "Workers in this replica's pool by health", "gauge",
         ("health",)),
    Spec("meshd_requests", "Requests by outcome", "counter", ("outcome",)),
    Spec("meshd_gateway_ttft_p50_seconds", "Median time to first token over the last window"),
    Spec("meshd_gateway_ttft_p95_seconds", "95th percentile time to first token over the "
         "last window"),
    Spec("meshd_gateway_prefix_hit_rate", "Workers' prefix-cache hits / queries over the last "
         "window"),
)
WINDOW_S = 60.0


class GatewayFigures:
    """The bridge's `read` for one replica (see the module doc)."""

    def __init__(self, runtime: GatewayRuntime, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.runtime = runtime
        self.clock = clock
        self._window = Window(window_s)

    def __call__(self) -> list[Sample]:
        rt = self.runtime
        m = rt.metrics
        entries = list(rt.pool.entries.values())
        healthy = sum(1 for e in entries if e.healthy)
        out = [Sample("meshd_gateway_in_flight", rt.handler.inflight),
               Sample("meshd_gateway_connections", rt.server.stats.connections),
               Sample("meshd_gateway_workers", healthy, ("healthy",)),
               Sample("meshd_gateway_workers", len(entries) - healthy, ("unhealthy",))]
        out += [Sample("meshd_requests", n, (outcome,))
                for outcome, n in sorted(m.requests.values.items())]
        hits = sum(e.load.prefix_hits for e in entries)
        queries = sum(e.load.prefix_queries for e in entries)
        *ttft, d_hits, d_queries = self._window.delta(self.clock(),
                                                      (*m.ttft.counts, hits, queries))
        bounds = m.ttft.bounds
        # a worker that restarted or left takes its totals along: no rate for that window
        rate = d_hits / d_queries if d_queries > 0 and d_hits >= 0 else 0.0
        out += [Sample("meshd_gateway_ttft_p50_seconds", quantile(bounds, ttft, 0.5)),
                Sample("meshd_gateway_ttft_p95_seconds", quantile(bounds, ttft, 0.95)),
                Sample("meshd_gateway_prefix_hit_rate", min(rate, 1.0))]
        return out
