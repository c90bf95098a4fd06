"""Gateway counters kept as plain ints on the hot path, exported to Prometheus at scrape time.

`GatewayStats` is mutated only from the event loop thread. `StatsCollector` reads it when the
registry is collected (GET /metrics), so counting a request costs a dict update, not a
prometheus_client lock and label lookup.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class GatewayStats:
    __slots__ = ("connections", "disconnects", "handler_timeouts", "in_flight", "responses")

    def __init__(self) -> None:
        self.responses: defaultdict[int, int] = defaultdict(int)  # status -> count
        self.connections = 0
        self.in_flight = 0
        self.disconnects = 0  # client went away while its request was in flight
        self.handler_timeouts = 0


class StatsCollector(Collector):
    def __init__(self, stats: GatewayStats) -> None:
        self._s = stats

    def collect(self) -> Iterator[Metric]:
        s = self._s
        c = CounterMetricFamily("meshd_gateway_responses", "HTTP responses by status",
                                labels=["status"])
        for status, n in sorted(s.responses.items()):
            c.add_metric([str(status)], n)
        yield c
        yield GaugeMetricFamily("meshd_gateway_connections", "Open client connections",
                                value=s.connections)
        yield GaugeMetricFamily("meshd_gateway_in_flight", "Requests inside a handler",
                                value=s.in_flight)
        yield CounterMetricFamily("meshd_gateway_client_disconnects",
                                  "Clients that left with a request in flight",
                                  value=s.disconnects)
        yield CounterMetricFamily("meshd_gateway_handler_timeouts",
                                  "Handlers cancelled at handler_timeout",
                                  value=s.handler_timeouts)
