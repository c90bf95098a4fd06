"""The gateway's serving metrics (Prometheus; mirrored to the Ray dashboard in the actor).

Measured here: TTFT, inter-token latency and end-to-end latency histograms, requests by
outcome, disaggregated vs local prefill, continuations, prefix-cache hit tokens. Summed from
the workers' own `/metrics` at scrape time (the gateway does not see transfers itself): KV
transfer bytes, seconds and failures, and blocks held by prefill leases. Computed at scrape
time from the replica's `CacheHealthMonitor`: cache-routing health (`meshd_cache_health_*`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from meshd.coordinator.gateway.serving.confidence import HALTED
from meshd.coordinator.gateway.serving.loop_metrics import (
    LoopCounter,
    LoopHistogram,
    LoopMetricsCollector,
)

if TYPE_CHECKING:
    from meshd.coordinator.gateway.serving.choice import ChoiceRun
    from meshd.coordinator.gateway.serving.shapes import Delta
    from meshd.coordinator.gateway.workers.cache_monitor import CacheHealthMonitor
    from meshd.coordinator.gateway.workers.pool import WorkerPool

_CONFIDENCE = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_WORKER_SUMS = {
    "meshd_engine_kv_transfer_pulled_bytes": "meshd_kv_transfer_bytes",
    "meshd_engine_kv_transfer_pull_seconds": "meshd_kv_transfer_seconds",
    "meshd_engine_kv_transfer_failures": "meshd_kv_transfer_failures",
    "meshd_engine_kv_leases_held": "meshd_kv_lease_blocks_held",
    "meshd_engine_local_prefill_fallbacks": "meshd_kv_transfer_local_fallbacks",
}


class _Timing:
    __slots__ = ("first", "last", "m", "start")

    def __init__(self, m: MeshMetrics, start: float) -> None:
        self.m, self.start, self.first, self.last = m, start, 0.0, 0.0

    def burst(self, deltas: Sequence[Delta]) -> None:
        """The deltas one worker read burst brought: the first token's time, then the gap
        since the last burst spread over the burst's tokens (each observed)."""
        n = 0
        for d in deltas:
            n += len(d.token_ids)
        if not n:
            return
        now = time.monotonic()
        if not self.first:
            self.first = now
            self.m.ttft.observe(now - self.start)
            n -= 1
            if not n:
                self.last = now
                return
            gap = 0.0  # the rest of the first burst came with it
        else:
            gap = (now - self.last) / n
        self.m.itl.observe(gap, n)
        self.last = now

    async def emit(self, deltas: list[Delta]) -> None:
        """An `Emit` for non-streamed choices: timing only."""
        self.burst(deltas)

    def done(self, outcome: str) -> None:
        self.m.e2e.observe(time.monotonic() - self.start)
        self.m.requests.inc(outcome)


class _WorkerSums:
    """Collector: sums of the workers' transfer and lease figures, read at scrape time."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        sums = dict.fromkeys(_WORKER_SUMS.values(), 0.0)
        for entry in list(self.pool.entries.values()):
            if not entry.metrics_text:
                continue
            try:
                for fam in text_string_to_metric_families(entry.metrics_text):
                    out = _WORKER_SUMS.get(fam.name.removesuffix("_total"))
                    if out is not None:
                        sums[out] += sum(s.value for s in fam.samples
                                         if not s.name.endswith("_created"))
            except ValueError:
                continue
        for name, value in sums.items():
            yield GaugeMetricFamily(name, f"Sum over workers of {name}.", value=value)


class _CacheHealth:
    """Collector: the cache-routing health report, judged at scrape time."""

    def __init__(self, monitor: CacheHealthMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rep = self.monitor.report()
        ok = GaugeMetricFamily("meshd_cache_health_ok",
                               "1 when no worker has a cache-routing issue, else 0.",
                               value=1.0 if rep.ok else 0.0)
        issues = GaugeMetricFamily("meshd_cache_health_issues",
                                   "1 per worker and cache-routing issue present.",
                                   labels=["worker", "issue"])
        age = GaugeMetricFamily("meshd_cache_health_event_age_seconds",
                                "Seconds since the worker's last KV event batch.",
                                labels=["worker"])
        for w in rep.workers:
            for code in w.issues:
                issues.add_metric([w.worker_id, code], 1.0)
            if w.batches_seen and w.seconds_since_event is not None:
                age.add_metric([w.worker_id], w.seconds_since_event)
        yield ok
        yield issues
        yield age


class MeshMetrics:
    """The serving figures. Mutated only from the replica's event loop (`loop_metrics`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.ttft = LoopHistogram("meshd_ttft_seconds", "Time to first token.", _LATENCY)
        self.itl = LoopHistogram("meshd_inter_token_seconds", "Inter-token latency.", _LATENCY)
        self.e2e = LoopHistogram("meshd_e2e_seconds", "End-to-end request latency.", _LATENCY)
        self.requests = LoopCounter("meshd_requests", "Requests by outcome.", "outcome")
        self.prefill = LoopCounter("meshd_prefill", "Choices by where the prompt was prefilled.",
                                   "mode")
        self.continuations = LoopCounter("meshd_decode_continuations",
                                         "Decodes continued on another worker after a failure.")
        self.cached_tokens = LoopCounter("meshd_prefix_cache_hit_tokens",
                                         "Prompt tokens served from a worker's prefix cache.")
        self.confidence = LoopHistogram("meshd_choice_confidence", "Mean token confidence "
                                        "(exp(-entropy)) of each scored choice.", _CONFIDENCE)
        self.halts = LoopCounter("meshd_confidence_halts", "Choices halted for low confidence.")
        self.registry.register(LoopMetricsCollector((
            self.ttft, self.itl, self.e2e, self.requests, self.prefill, self.continuations,
            self.cached_tokens, self.confidence, self.halts)))
        self._workers_registered = False

    def watch_workers(self, pool: WorkerPool) -> None:
        if not self._workers_registered:
            self.registry.register(_WorkerSums(pool))
            self._workers_registered = True

    def watch_health(self, monitor: CacheHealthMonitor) -> None:
        self.registry.register(_CacheHealth(monitor))

    def request(self, start: float) -> _Timing:
        return _Timing(self, start)

    def observe_runs(self, runs: Sequence[ChoiceRun]) -> None:
        for run in runs:
            lc = run.lc
            if lc.prefill_attempts:
                mode = "fallback_local" if lc.failures and any(
                    f[0].value == "prefill" for f in lc.failures) else "disaggregated"
            else:
                mode = "local"
            self.prefill.inc(mode)
            if lc.decode_attempts > 1:
                self.continuations.inc(amount=lc.decode_attempts - 1)
            if run.out.cached_tokens:
                self.cached_tokens.inc(amount=run.out.cached_tokens)
            meter = run.spec.meter
            if meter is not None and meter.count:
                self.confidence.observe(meter.sum / meter.count)
                if run.out.finish_reason == HALTED:
                    self.halts.inc()
