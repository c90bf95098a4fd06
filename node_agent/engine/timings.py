"""Request timing histograms of the embedded engine, in vLLM's names and meanings.

    vllm:request_prefill_time_seconds   first scheduled -> first token (preemptions included)
    vllm:request_prompt_tokens          prompt length, observed with the prefill time
    vllm:inter_token_latency_seconds    gap between two tokens of a request

vLLM observes the first two when a request finishes; here both are observed at the first
token (the same pairs, a little earlier). The gateway calibrates its cost model from their
`_sum`/`_count` (`coordinator/gateway/workers/calibration.py`). Fixed buckets: `observe` is
O(log buckets) without allocation; `snapshot` copies the counts for the `/metrics` renderer.
Called only from the engine's step thread.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from meshd.node_agent.engine.scheduler import ScheduledSeq
    from meshd.node_agent.engine.sequence import Sequence

# vLLM's bounds are for GPUs; these also resolve a CPU engine's milliseconds
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
           60.0, 120.0)
TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class HistogramSnapshot(NamedTuple):
    bounds: tuple[float, ...]  # upper bounds; a last bucket (+Inf) follows
    counts: tuple[int, ...]  # per bucket (not cumulative), len(bounds) + 1
    sum: float
    observations: int


class Histogram:
    __slots__ = ("_counts", "bounds", "count", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.bounds, tuple(self._counts), self.sum, self.count)


class RequestTimings:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.prefill = Histogram(SECONDS)
        self.prompt = Histogram(TOKENS)
        self.itl = Histogram(SECONDS)
        self._scheduled: dict[str, float] = {}  # request -> first scheduled
        self._last: dict[str, float] = {}  # request -> its last token
        self._now = 0.0

    def scheduled(self, sched: Iterable[ScheduledSeq]) -> None:
        """A step was planned: note when each request was first scheduled."""
        now = self.clock()
        for s in sched:
            self._scheduled.setdefault(s.seq.request_id, now)

    def stepped(self) -> None:
        """The step's forward pass is done: its tokens are produced now."""
        self._now = self.clock()

    def token(self, seq: Sequence, first: bool) -> None:
        rid, now = seq.request_id, self._now
        if first:
            t0 = self._scheduled.get(rid)
            if t0 is not None:
                self.prefill.observe(now - t0)
                self.prompt.observe(seq.num_prompt)
        else:
            last = self._last.get(rid)
            if last is not None:
                self.itl.observe(now - last)
        self._last[rid] = now

    def forget(self, request_id: str) -> None:
        """The request finished or was aborted."""
        self._scheduled.pop(request_id, None)
        self._last.pop(request_id, None)

    def snapshot(self) -> tuple[tuple[str, HistogramSnapshot], ...]:
        return (("vllm:request_prefill_time_seconds", self.prefill.snapshot()),
                ("vllm:request_prompt_tokens", self.prompt.snapshot()),
                ("vllm:inter_token_latency_seconds", self.itl.snapshot()))
