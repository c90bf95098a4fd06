"""The fleet's `/metrics`: several gateway replicas' expositions merged into one (pure).

Every replica keeps its own Prometheus registry; the shared port answers GET /metrics with all
of them combined, so any scrape gives the same fleet totals. Text in, text out: each reply is
parsed with `prometheus_client`'s parser and the result written with its exposition.

How samples of the same name and labels combine (`rule`):
- counters, histograms (every bucket, `_sum`, `_count`) and summaries (`_sum`, `_count`; a
  quantile cannot be added, so quantile samples are left out): summed.
- `*_created` (a counter's or histogram's start time, a gauge in the text format): the minimum.
- gauges: by `GAUGES`. Additive ones (connections, requests in flight) are summed. Figures every
  replica computes from the same source are not: the sums over the workers' own counters
  (`meshd_kv_*`) take the largest replica's value (the freshest scrape of counters that only
  grow), cache-routing health takes the worst (`ok` the minimum, issues and event age the
  maximum).
- a gauge not in `GAUGES` (or an untyped family): `UNKNOWN_GAUGE`, the maximum. It is never
  summed, since a figure computed from a shared source would come out multiplied; at worst an
  additive gauge nobody listed shows one replica's value. `test_metrics_merge.py` (tests/)
  fails for any gauge the gateway exports without a rule here.

A family whose type differs from the first reply's (a replica of another version) is left out
of the merge for that reply, as is a sample whose name another family already writes. The view
says who is in it: `meshd_gateway_replicas_expected`, `meshd_gateway_replicas_scraped` and
`meshd_gateway_replica_up{replica, address}` (address: the replica's own metrics port, where its
figures alone are served).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from types import MappingProxyType
from typing import NamedTuple

from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector


class Combine(enum.Enum):
    SUM = "sum"
    MAX = "max"
    MIN = "min"


_FOLD: dict[Combine, Callable[[float, float], float]] = {
    Combine.SUM: lambda a, b: a + b, Combine.MAX: max, Combine.MIN: min}

# Gauges by family name. Counters, histograms and summaries are always summed.
GAUGES = MappingProxyType({
    "meshd_gateway_connections": Combine.SUM,
    "meshd_gateway_in_flight": Combine.SUM,
    # every replica sums the same workers' /metrics (request_metrics._WorkerSums)
    "meshd_kv_transfer_bytes": Combine.MAX,
    "meshd_kv_transfer_seconds": Combine.MAX,
    "meshd_kv_transfer_failures": Combine.MAX,
    "meshd_kv_transfer_local_fallbacks": Combine.MAX,
    "meshd_kv_lease_blocks_held": Combine.MAX,
    # every replica judges the same workers (request_metrics._CacheHealth): the worst view
    "meshd_cache_health_ok": Combine.MIN,
    "meshd_cache_health_issues": Combine.MAX,
    "meshd_cache_health_event_age_seconds": Combine.MAX,
    # each replica's own admission state (governance/metrics.py): additive, or the worst link
    "meshd_reservations_outstanding": Combine.SUM,
    "meshd_reserved_units": Combine.SUM,
    "meshd_fair_queue_depth": Combine.SUM,
    "meshd_fair_active": Combine.SUM,
    "meshd_ledger_leases_valid": Combine.MIN,
})
UNKNOWN_GAUGE = Combine.MAX
_SUMMED = frozenset({"counter", "histogram", "summary"})
FLEET_FAMILIES = frozenset({"meshd_gateway_replicas_expected", "meshd_gateway_replicas_scraped",
                            "meshd_gateway_replica_up"})


class Reply(NamedTuple):
    """One replica's part of a fleet scrape. `text` None: it did not answer in time."""

    replica: int
    address: str  # host:port of its own /metrics ("" when not known)
    text: str | None


def rule(name: str, typ: str) -> Combine:
    """How the samples of family `name` (parser type `typ`) from several replicas combine."""
    if typ in _SUMMED:
        return Combine.SUM
    if name.endswith("_created"):
        return Combine.MIN
    return GAUGES.get(name, UNKNOWN_GAUGE)


def parse(text: str) -> list[Metric]:
    """The families of one exposition; raises ValueError for text that is not one."""
    try:
        return list(text_string_to_metric_families(text))
    except (IndexError, KeyError, TypeError) as e:  # the parser's other ways to reject input
        raise ValueError(f"not a Prometheus exposition: {e}") from None


def merge(expositions: Sequence[Sequence[Metric]]) -> list[Metric]:
    """Combine parsed expositions family by family (`rule`), in first-seen order. Timestamps
    and exemplars are dropped, and so are families without samples; the fleet families are
    left out (`fleet_exposition` adds its own)."""
    heads: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    owner: dict[str, str] = {}  # sample name -> its family (a name is written by one family)
    for families in expositions:
        for fam in families:
            if fam.name in FLEET_FAMILIES:
                continue
            head = heads.get(fam.name)
            if head is None:
                head = heads[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                values[fam.name] = {}
            elif head.type != fam.type:
                continue
            fold, acc = _FOLD[rule(fam.name, fam.type)], values[fam.name]
            for s in fam.samples:
                if ((fam.type == "summary" and s.name == fam.name)  # a quantile
                        or owner.setdefault(s.name, fam.name) != fam.name):
                    continue
                key = (s.name, tuple(sorted(s.labels.items())))
                prev = acc.get(key)
                acc[key] = float(s.value) if prev is None else fold(prev, float(s.value))
    for name, head in heads.items():
        for (sample, labels), value in values[name].items():
            head.add_sample(sample, dict(labels), value)
    return [head for head in heads.values() if head.samples]


def fleet_exposition(replies: Sequence[Reply], expected: int) -> bytes:
    """The merged exposition of `replies` plus who is in it. A reply whose text is None or
    not an exposition counts as not scraped."""
    parsed: list[list[Metric]] = []
    up = GaugeMetricFamily("meshd_gateway_replica_up",
                           "1 per gateway replica in this fleet view, 0 per one left out (no "
                           "answer in time); address: its own /metrics.",
                           labels=["replica", "address"])
    for r in sorted(replies, key=lambda r: r.replica):
        families = None
        if r.text is not None:
            try:
                families = parse(r.text)
            except ValueError:
                families = None
        if families is not None:
            parsed.append(families)
        up.add_metric([str(r.replica), r.address], 1.0 if families is not None else 0.0)
    out = merge(parsed)
    out.append(GaugeMetricFamily("meshd_gateway_replicas_expected",
                                 "Gateway replicas a fleet view should include.",
                                 value=expected))
    out.append(GaugeMetricFamily("meshd_gateway_replicas_scraped",
                                 "Gateway replicas whose figures are in this fleet view.",
                                 value=len(parsed)))
    out.append(up)
    return generate_latest(_Families(out))


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)
