"""meshd's figures on the Ray dashboard: a bridge into `ray.util.metrics`.

The dashboard's Metrics view (and the Grafana it embeds) shows what Ray's metrics agent exports
on its Prometheus port: what processes record through `ray.util.metrics`, named `ray_<name>`
(counters `ray_<name>_total`). meshd keeps its figures in plain in-memory state; a
`RayMetricsBridge` copies a chosen set of them into Ray metric objects:

- the owner hands it `Spec`s (what is exported) and `read()`, which returns `Sample`s: cheap
  reads of in-memory state, no I/O and no waits, called where that state is owned (the
  gateway's and the registry's event loop; the ledger's one call thread);
- `copy()` reads once and records. Recording a Ray metric is an in-process call (the core
  worker exports in the background), so it never waits; `run(period_s)` is a task on the owner's
  loop that copies every period, and `ThrottledCopy` copies at most once a period from
  synchronous code;
- every series carries tag `actor` (the actor's Ray name): Ray's own tags name the worker
  process (`WorkerId`), not the actor;
- a counter's source is a cumulative total: the bridge adds the increase since its last copy
  (a total that went down, a restarted source, is added whole).

`ray` is imported only by the default metric factory, so the readers, `Window` and `quantile`
run without it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, NamedTuple

log = logging.getLogger("meshd.ray_metrics")
ACTOR_TAG = "actor"
PERIOD_S = 5.0  # Ray's own export interval is 10 s


class Spec(NamedTuple):
    """One exported metric: `tags` are its tag keys besides `actor`."""

    name: str
    doc: str
    kind: Literal["gauge", "counter"] = "gauge"
    tags: tuple[str, ...] = ()


class Sample(NamedTuple):
    """One reading: `tags` are the values of its spec's tag keys, in order; a counter's
    `value` is its cumulative total."""

    name: str
    value: float
    tags: tuple[str, ...] = ()


def ray_metric(spec: Spec) -> Any:
    """The `ray.util.metrics` object for `spec` (the default factory)."""
    from ray.util import metrics as rm

    keys = (ACTOR_TAG, *spec.tags)
    if spec.kind == "counter":
        return rm.Counter(spec.name, spec.doc, tag_keys=keys)
    return rm.Gauge(spec.name, spec.doc, tag_keys=keys)


class RayMetricsBridge:
    """Copies `read()`'s samples into one metric per spec, tagged `actor=<actor>`.

    Not thread-safe: call `copy` from one thread (the one that owns what `read` reads)."""

    def __init__(self, actor: str, specs: Sequence[Spec], read: Callable[[], Iterable[Sample]],
                 factory: Callable[[Spec], Any] = ray_metric) -> None:
        self.actor = actor
        self.read = read
        self._specs = {s.name: s for s in specs}
        self._metrics = {s.name: factory(s) for s in specs}
        self._totals: dict[tuple[str, tuple[str, ...]], float] = {}
        self.copies = 0
        self.skipped = 0  # samples no spec matches: a reader bug, counted and logged once

    def copy(self) -> int:
        """Read once and record every sample; returns how many were recorded."""
        n = 0
        for s in self.read():
            spec = self._specs.get(s.name)
            if spec is None or len(s.tags) != len(spec.tags):
                if not self.skipped:
                    log.warning("%s: sample %s matches no spec; skipped", self.actor, s)
                self.skipped += 1
                continue
            tags = {ACTOR_TAG: self.actor, **dict(zip(spec.tags, s.tags, strict=True))}
            metric = self._metrics[s.name]
            if spec.kind == "gauge":
                metric.set(float(s.value), tags=tags)
            else:
                key = (s.name, s.tags)
                last = self._totals.get(key, 0.0)
                self._totals[key] = s.value
                grown = s.value - last if s.value >= last else s.value
                if grown > 0:
                    metric.inc(grown, tags=tags)
            n += 1
        self.copies += 1
        return n

    async def run(self, period_s: float = PERIOD_S) -> None:
        """Copy now and every `period_s` until cancelled; a failed copy is logged and the next
        one tried (the figures must never take the actor down)."""
        while True:
            try:
                self.copy()
            except Exception:
                log.exception("%s: copying figures to ray.util.metrics failed", self.actor)
            await asyncio.sleep(period_s)


class ThrottledCopy:
    """`bridge.copy()` at most once every `period_s`, for synchronous owners without a loop."""

    def __init__(self, bridge: RayMetricsBridge, period_s: float = PERIOD_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bridge, self.period_s, self.clock = bridge, period_s, clock
        self._next = 0.0

    def __call__(self) -> None:
        now = self.clock()
        if now < self._next:
            return
        self._next = now + self.period_s
        try:
            self.bridge.copy()
        except Exception:
            log.exception("%s: copying figures to ray.util.metrics failed", self.bridge.actor)


class Window:
    """Increase of cumulative figures over about the last `window_s`: `delta(now, values)`
    records a reading and returns it minus the newest earlier reading at least `window_s` old
    (the oldest one while none is; the first reading minus zeros: everything so far)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._readings: deque[tuple[float, tuple[float, ...]]] = deque()

    def delta(self, now: float, values: Sequence[float]) -> tuple[float, ...]:
        r = self._readings
        while len(r) > 1 and r[1][0] <= now - self.window_s:
            r.popleft()
        base = r[0][1] if r and len(r[0][1]) == len(values) else (0.0,) * len(values)
        r.append((now, tuple(values)))
        return tuple(v - b for v, b in zip(values, base, strict=True))


def quantile(bounds: Sequence[float], counts: Sequence[float], q: float) -> float:
    """The `q` quantile of a histogram, interpolated within its bucket as Prometheus'
    `histogram_quantile` does. `bounds`: the finite upper bounds, ascending; `counts`: the
    observations per bucket (not cumulative), one more than `bounds` (the last is +Inf).
    0.0 when there are no observations; the largest finite bound when it falls in +Inf."""
    assert len(counts) == len(bounds) + 1, (len(counts), len(bounds))
    total = sum(counts)
    if total <= 0 or not bounds:
        return 0.0
    rank, seen = q * total, 0.0
    for i, n in enumerate(counts[:-1]):
        if n > 0 and seen + n >= rank:
            lo = bounds[i - 1] if i else 0.0
            return lo + (bounds[i] - lo) * (rank - seen) / n
        seen += n
    return float(bounds[-1])
