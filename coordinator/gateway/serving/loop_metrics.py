"""Counters and histograms for the serving hot path: plain ints on the event loop thread.

`prometheus_client`'s `Histogram.observe` takes a lock and its `Counter.labels()` a lock and a
lookup; the gateway counts several times per streamed token, always from its one event loop
thread. These keep plain numbers (no lock: mutate only from that thread) and are exported
when the registry is collected (a scrape), as the same families `prometheus_client` would
write (`_total`, `_bucket`/`_sum`/`_count`), so dashboards and the fleet merge see no change.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector


class LoopHistogram:
    """Cumulative-bucket histogram (upper bounds inclusive, as Prometheus' `le`)."""

    __slots__ = ("bounds", "counts", "doc", "name", "sum")

    def __init__(self, name: str, doc: str, buckets: Sequence[float]) -> None:
        self.name, self.doc = name, doc
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        """`count` observations of `value`."""
        self.counts[bisect_left(self.bounds, value)] += count
        self.sum += value * count

    def family(self) -> HistogramMetricFamily:
        cum, buckets = 0, []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cum += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cum))
        return HistogramMetricFamily(self.name, self.doc, buckets=buckets, sum_value=self.sum)


class LoopCounter:
    """A counter, optionally by one label; `inc(label)` adds to that label's count."""

    __slots__ = ("doc", "label", "name", "values")

    def __init__(self, name: str, doc: str, label: str | None = None) -> None:
        self.name, self.doc, self.label = name, doc, label
        self.values: dict[str, float] = {}

    def inc(self, key: str = "", amount: float = 1.0) -> None:
        self.values[key] = self.values.get(key, 0.0) + amount

    def value(self, key: str = "") -> float:
        return self.values.get(key, 0.0)

    def family(self) -> CounterMetricFamily:
        if self.label is None:
            return CounterMetricFamily(self.name, self.doc, value=self.values.get("", 0.0))
        fam = CounterMetricFamily(self.name, self.doc, labels=[self.label])
        for key, v in sorted(self.values.items()):
            fam.add_metric([key], v)
        return fam


class LoopMetricsCollector(Collector):
    """Exports the given loop metrics at scrape time."""

    def __init__(self, metrics: Iterable[LoopHistogram | LoopCounter]) -> None:
        self.metrics = tuple(metrics)

    def collect(self) -> Iterator[Metric]:
        for m in self.metrics:
            yield m.family()
