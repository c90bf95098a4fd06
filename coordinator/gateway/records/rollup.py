"""Hourly rollups of request records: counters plus a fixed log-spaced latency histogram. Pure
data, no I/O; the store (`store.py`) persists them.

Histogram buckets (seconds), the same for TTFT and end-to-end latency:

    index 0              [0, 1 ms)                     (also any value <= 0)
    index i, 1..160      [1 ms * 2**((i-1)/8), 1 ms * 2**(i/8))   8 buckets per doubling
    index 161            [1048.576 s, inf)

A quantile is the nearest-rank one (the ceil(q*n)-th smallest value), estimated as the geometric
midpoint of the bucket holding it, clamped to the observed max. For a true quantile x in
[1 ms, 1048.576 s) the estimate e satisfies |e/x - 1| <= 2**(1/16) - 1 (`REL_ERROR`, 4.43 %);
below 1 ms the estimate is 0.5 ms (absolute error <= 0.5 ms); past 1048.576 s it is the max.
Histograms merge exactly (bucket counts add), so a quantile over merged hours has the same bound.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

LOW_S = 1e-3
PER_DOUBLING = 8
LOG_BUCKETS = 160  # 20 doublings: 1 ms .. 1048.576 s
OVERFLOW = LOG_BUCKETS + 1
HIGH_S = LOW_S * 2.0 ** (LOG_BUCKETS / PER_DOUBLING)
REL_ERROR = 2.0 ** (1 / (2 * PER_DOUBLING)) - 1


def lower_bound(i: int) -> float:
    """The inclusive lower bound of bucket `i` in seconds (0.0 for the underflow bucket)."""
    return 0.0 if i <= 0 else LOW_S * 2.0 ** ((i - 1) / PER_DOUBLING)


def bucket_of(v: float) -> int:
    """The bucket index holding `v` seconds (exact at the bounds `lower_bound` gives)."""
    if not v >= LOW_S:  # also NaN
        return 0
    if v >= HIGH_S:
        return OVERFLOW
    i = int(math.log2(v / LOW_S) * PER_DOUBLING) + 1
    if v < lower_bound(i):
        return i - 1
    return i + 1 if v >= lower_bound(i + 1) else i


def representative(i: int) -> float:
    """The value a quantile falling in bucket `i` is reported as (before the max clamp)."""
    if i <= 0:
        return LOW_S / 2
    if i >= OVERFLOW:
        return math.inf
    return LOW_S * 2.0 ** ((i - 0.5) / PER_DOUBLING)


@dataclass(slots=True)
class Histogram:
    """Count, sum, max and sparse bucket counts (index -> count) of one latency."""
    count: int = 0
    total: float = 0.0
    max: float = 0.0
    buckets: dict[int, int] = field(default_factory=dict)

    def add(self, v: float) -> None:
        self.count += 1
        self.total += v
        if v > self.max:
            self.max = v
        i = bucket_of(v)
        self.buckets[i] = self.buckets.get(i, 0) + 1

    def merge(self, other: Histogram) -> None:
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)
        for i, c in other.buckets.items():
            self.buckets[i] = self.buckets.get(i, 0) + c

    def quantile(self, q: float) -> float | None:
        """The approximate nearest-rank `q`-quantile (0 < q <= 1); None when empty."""
        if self.count == 0:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for i in sorted(self.buckets):
            seen += self.buckets[i]
            if seen >= rank:
                return min(representative(i), self.max)
        return self.max  # unreachable while the bucket counts sum to `count`

    def encode(self) -> str:
        """The bucket counts as compact JSON `[[index, count], ...]`, ascending."""
        return json.dumps(sorted(self.buckets.items()), separators=(",", ":"))

    @classmethod
    def decode(cls, count: int, total: float, vmax: float, encoded: str) -> Histogram:
        return cls(count, total, vmax, {int(i): int(c) for i, c in json.loads(encoded)})


@dataclass(slots=True)
class Rollup:
    """One (hour, tenant, model)'s totals. `errors` counts outcomes other than "ok"; `ttft`
    holds only the requests that sent a token."""
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft: Histogram = field(default_factory=Histogram)
    e2e: Histogram = field(default_factory=Histogram)

    def add(self, ok: bool, prompt: int, cached: int, completion: int, ttft_s: float | None,
            e2e_s: float) -> None:
        self.requests += 1
        self.errors += not ok
        self.prompt_tokens += prompt
        self.cached_tokens += cached
        self.completion_tokens += completion
        if ttft_s is not None:
            self.ttft.add(ttft_s)
        self.e2e.add(e2e_s)

    def merge(self, other: Rollup) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.prompt_tokens += other.prompt_tokens
        self.cached_tokens += other.cached_tokens
        self.completion_tokens += other.completion_tokens
        self.ttft.merge(other.ttft)
        self.e2e.merge(other.e2e)

    def summary(self) -> dict[str, int | float | None]:
        """Counters plus, per latency, count, sum, max, p50 and p95 (`ttft_p50_s`, ...)."""
        out: dict[str, int | float | None] = {
            "requests": self.requests, "errors": self.errors,
            "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens}
        for name, h in (("ttft", self.ttft), ("e2e", self.e2e)):
            out |= {f"{name}_count": h.count, f"{name}_sum_s": h.total,
                    f"{name}_max_s": h.max if h.count else None,
                    f"{name}_p50_s": h.quantile(0.5), f"{name}_p95_s": h.quantile(0.95)}
        return out
