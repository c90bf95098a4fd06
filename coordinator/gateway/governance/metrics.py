"""Governance figures on /metrics, per tenant with bounded label cardinality.

A tenant is a label only when the policy names it (or it is the default tenant); every other
tenant is counted as "other", so a flood of unknown tenants cannot grow the exposition. Plain
numbers mutated from the replica's event loop, exported at scrape time (like
`serving/loop_metrics.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from time import thread_time_ns
from typing import TYPE_CHECKING, Any, ClassVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshd.coordinator.gateway.serving.loop_metrics import LoopHistogram

if TYPE_CHECKING:
    from meshd.coordinator.gateway.governance.admission import Governor

_WAIT = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class CpuSample:
    """The CPU time of a code path, read on one call in `EVERY`: the thread's CPU clock, so a
    wait or a preemption in between is not counted; reading it is a system call (~0.6 us hot,
    2-3 us cold: part of each sample), hence the sampling. `start` returns 0 on a call not
    sampled.

    What the clock itself costs is measured where the samples are taken: halfway between two
    samples, `start` reads the clock twice back to back (a sample of nothing, in place: the
    same cold caches). `net_mean_us` subtracts the mean of those, a lower bound of the clock's
    share of a real sample (its second read follows the first at once, so it is warmer), or
    the hot floor `clock_ns()` before any was taken."""

    EVERY = 16
    __slots__ = ("calls", "ns", "null_ns", "nulls", "samples")
    _clock_ns: ClassVar[int | None] = None  # measured once, on the first net_mean_us()

    def __init__(self) -> None:
        self.calls = self.ns = self.samples = self.nulls = self.null_ns = 0

    def start(self) -> int:
        self.calls += 1
        phase = self.calls % self.EVERY
        if phase == 0:
            return thread_time_ns()
        if phase == self.EVERY >> 1:  # a sample of nothing, in place
            t0 = thread_time_ns()
            self.null_ns += thread_time_ns() - t0
            self.nulls += 1
        return 0

    def stop(self, t0: int) -> None:
        self.ns += thread_time_ns() - t0
        self.samples += 1

    def mean_us(self) -> float | None:
        """The mean sample, the clock's own cost included."""
        return round(self.ns / self.samples / 1000, 2) if self.samples else None

    def clock_us(self) -> float:
        """What a sample of nothing reads: in place, else the hot floor."""
        ns = self.null_ns / self.nulls if self.nulls else self.clock_ns()
        return round(ns / 1000, 2)

    def net_mean_us(self) -> float | None:
        """The mean sample less what a sample of nothing reads (the clock's own cost)."""
        if not self.samples:
            return None
        null = self.null_ns / self.nulls if self.nulls else self.clock_ns()
        return round(max(0.0, self.ns / self.samples - null) / 1000, 2)

    @classmethod
    def clock_ns(cls) -> int:
        """The hot floor of a sample of nothing: the median of 201 back-to-back clock reads."""
        if cls._clock_ns is None:
            reads = []
            for _ in range(201):
                t0 = thread_time_ns()
                reads.append(thread_time_ns() - t0)
            cls._clock_ns = sorted(reads)[100]
        return cls._clock_ns


class GovernanceMetrics:
    def __init__(self, gov: Governor) -> None:
        self.gov = gov
        self.known: frozenset[str] = frozenset()
        self.admissions: dict[str, int] = {}  # tenant -> admitted (labelled when read)
        self.refusals: dict[tuple[str, str], int] = {}  # (tenant label, reason) -> refused
        self._trips: dict[tuple[str, str, str], int] = {}  # (tenant, rule, action) -> verdicts
        self.fail_open = 0
        self.reload_errors = 0
        self.queue_wait = LoopHistogram("meshd_fair_queue_wait_seconds",
                                        "Time requests waited in the fair-share queue.", _WAIT)

    def label(self, tenant: str) -> str:
        return tenant if tenant in self.known else "other"

    @staticmethod
    def _inc(d: dict[Any, int], key: Any, n: int = 1) -> None:
        d[key] = d.get(key, 0) + n

    def admitted(self, tenant: str) -> None:
        a = self.admissions
        a[tenant] = a.get(tenant, 0) + 1

    def refused(self, tenant: str, reason: str) -> None:
        self._inc(self.refusals, (self.label(tenant), reason))

    @property
    def outcomes(self) -> dict[tuple[str, str], int]:
        """(tenant label, admitted | the rule that refused) -> requests."""
        out = dict(self.refusals)
        for tenant, n in self.admissions.items():
            self._inc(out, (self.label(tenant), "admitted"), n)
        return out

    @property
    def usage(self) -> dict[str, list[int]]:
        """tenant label -> [prompt, cached, completion, nano-USD] (from the usage buffer, so
        the request path books usage once)."""
        out: dict[str, list[int]] = {}
        for tenant, v in self.gov.usage.totals().items():
            acc = out.setdefault(self.label(tenant), [0, 0, 0, 0])
            for i in range(4):
                acc[i] += v[i]
        return out

    @property
    def tokens(self) -> dict[tuple[str, str], int]:
        """(tenant, prompt | cached | completion) -> tokens."""
        return {(t, kind): u[i] for t, u in self.usage.items()
                for i, kind in enumerate(("prompt", "cached", "completion"))}

    @property
    def spend(self) -> dict[str, int]:
        """tenant -> nano-USD."""
        return {t: u[3] for t, u in self.usage.items()}

    def loop(self, tenant: str, rule: str, action: str) -> None:
        key = (tenant, rule, action)  # labelled when read: a tripped rule may hold per request
        self._trips[key] = self._trips.get(key, 0) + 1

    @property
    def loops(self) -> dict[tuple[str, str, str], int]:
        """(tenant label, rule, action) -> loop-breaker verdicts."""
        out: dict[tuple[str, str, str], int] = {}
        for (tenant, rule, action), n in self._trips.items():
            self._inc(out, (self.label(tenant), rule, action), n)
        return out

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(_Collector(self))


class _Collector(Collector):
    def __init__(self, m: GovernanceMetrics) -> None:
        self.m = m

    def collect(self) -> Iterator[Metric]:
        m, gov = self.m, self.m.gov
        adm = CounterMetricFamily("meshd_admission", "Admission decisions by tenant and "
                                  "outcome (admitted, or the rule that refused).",
                                  labels=["tenant", "outcome"])
        for (t, o), v in sorted(m.outcomes.items()):
            adm.add_metric([t, o], v)
        yield adm
        tok = CounterMetricFamily("meshd_tenant_tokens", "Tokens used by tenant (prompt, of "
                                  "which cached, completion).", labels=["tenant", "kind"])
        for (t, k), v in sorted(m.tokens.items()):
            tok.add_metric([t, k], v)
        yield tok
        usd = CounterMetricFamily("meshd_tenant_spend_usd", "Spend by tenant at the price "
                                  "table, in USD.", labels=["tenant"])
        for t, v in sorted(m.spend.items()):
            usd.add_metric([t], v / 1e9)
        yield usd
        loops = CounterMetricFamily("meshd_loop_detections", "Runaway-loop detections by "
                                    "tenant, rule and action.",
                                    labels=["tenant", "rule", "action"])
        for (t, r, a), v in sorted(m.loops.items()):
            loops.add_metric([t, r, a], v)
        yield loops
        yield GaugeMetricFamily("meshd_reservations_outstanding", "Admitted requests whose "
                                "reservation is not settled yet.", value=gov.outstanding)
        yield GaugeMetricFamily("meshd_reserved_units", "Units reserved on this replica's "
                                "leases by running requests (all meters).",
                                value=gov.book.inflight())
        yield GaugeMetricFamily("meshd_fair_queue_depth", "Requests waiting in the fair-share "
                                "queue.", value=gov.fair.depth())
        yield GaugeMetricFamily("meshd_fair_active", "Requests holding a fair-share slot.",
                                value=gov.fair.active)
        syncs = CounterMetricFamily("meshd_ledger_syncs", "Syncs with the fleet ledger.",
                                    labels=["result"])
        syncs.add_metric(["ok"], gov.keeper.syncs)
        syncs.add_metric(["failed"], gov.keeper.failures)
        yield syncs
        yield GaugeMetricFamily("meshd_ledger_leases_valid", "1 while this replica's ledger "
                                "leases are usable.", value=float(gov.book.valid(gov.clock())))
        yield CounterMetricFamily("meshd_ledger_resets", "Times the ledger expired this "
                                  "replica's leases.", value=gov.book.resets)
        yield CounterMetricFamily("meshd_admission_fail_open", "Requests served without a "
                                  "lease while the ledger was unreachable (fail_mode open).",
                                  value=m.fail_open)
        yield CounterMetricFamily("meshd_governance_reload_errors", "Policy reloads refused "
                                  "(the policy in force was kept).", value=m.reload_errors)
        yield m.queue_wait.family()
