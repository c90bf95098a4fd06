"""What the planner sees of a workload over one window (`WorkloadStats`: rates, prompt and
output length quantiles, prefix-hit ratio), and the seeded synthetic requests drawn from it
(`sample_workload`) that every candidate split is scored on (`planner.py`)."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from meshd.scheduler.sim.trace import TRACE_BLOCK_TOKENS, TraceRequest

Quantiles = tuple[tuple[float, int], ...]  # (q in [0, 1], value) pairs, q increasing
STAT_QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


BURST_FRACTION = 0.25  # share of time the sampled workload spends at the peak rate


@dataclass(frozen=True, slots=True)
class WorkloadStats:
    """What the gateway observes over one window: the mean arrival rate, the peak rate (the
    busiest `burst_s`-second sub-window; 0 = not observed, treated as the mean), prompt and
    output token quantiles, and the prefix-cache hit ratio (cached / prompt tokens)."""

    arrival_rate_rps: float
    prompt_tokens: Quantiles
    output_tokens: Quantiles
    peak_rate_rps: float = 0.0
    burst_s: float = 2.0
    prefix_hit_ratio: float = 0.0

    def __post_init__(self) -> None:
        if not self.arrival_rate_rps > 0:
            raise ValueError(f"stats.arrival_rate_rps: must be > 0, got {self.arrival_rate_rps}")
        if not (self.peak_rate_rps == 0 or self.peak_rate_rps >= self.arrival_rate_rps):
            raise ValueError(f"stats.peak_rate_rps: must be 0 or >= arrival_rate_rps, "
                             f"got {self.peak_rate_rps}")
        if not self.burst_s > 0:
            raise ValueError(f"stats.burst_s: must be > 0, got {self.burst_s}")
        if not 0.0 <= self.prefix_hit_ratio < 1.0:
            raise ValueError(f"stats.prefix_hit_ratio: must be in [0, 1), "
                             f"got {self.prefix_hit_ratio}")
        for name in ("prompt_tokens", "output_tokens"):
            _check_quantiles(name, getattr(self, name))

    @staticmethod
    def from_requests(requests: Sequence[TraceRequest], window_s: float,
                      prefix_hit_ratio: float = 0.0, burst_s: float = 2.0,
                      quantiles: Sequence[float] = STAT_QUANTILES) -> WorkloadStats:
        """Stats of the requests (>= 2) that arrived in one window of `window_s` seconds
        starting at the first of them; the peak over its full `burst_s` sub-windows."""
        if len(requests) < 2:
            raise ValueError(f"requests: need >= 2 in a window, got {len(requests)}")
        if not window_s > 0:
            raise ValueError(f"window_s: must be > 0, got {window_s}")
        rate = len(requests) / window_s
        t0 = min(r.arrival_s for r in requests)
        counts = [0] * int(window_s // burst_s)
        for r in requests:
            k = int((r.arrival_s - t0) // burst_s)
            if k < len(counts):
                counts[k] += 1
        peak = max(max(counts, default=0) / burst_s, rate)
        return WorkloadStats(rate, _quantiles([r.input_tokens for r in requests], quantiles),
                             _quantiles([r.output_tokens for r in requests], quantiles),
                             peak, burst_s, prefix_hit_ratio)


def _check_quantiles(name: str, qs: Quantiles) -> None:
    if not qs:
        raise ValueError(f"stats.{name}: need at least one (quantile, value) pair")
    for i, (q, v) in enumerate(qs):
        if not 0.0 <= q <= 1.0 or v < 1:
            raise ValueError(f"stats.{name}: ({q}, {v}): q must be in [0, 1], value >= 1")
        if i and (q <= qs[i - 1][0] or v < qs[i - 1][1]):
            raise ValueError(f"stats.{name}: quantiles must increase and values not decrease")


def _quantiles(xs: Sequence[int], qs: Sequence[float]) -> Quantiles:
    s = sorted(xs)
    return tuple((q, max(1, s[min(len(s) - 1, round(q * (len(s) - 1)))])) for q in qs)


def _inverse_cdf(qs: Quantiles, u: float) -> int:
    """Piecewise-linear inverse CDF through the quantile points (clamped at the ends)."""
    if u <= qs[0][0]:
        return qs[0][1]
    for (q0, v0), (q1, v1) in itertools.pairwise(qs):
        if u <= q1:
            return round(v0 + (v1 - v0) * (u - q0) / (q1 - q0))
    return qs[-1][1]


def sample_workload(stats: WorkloadStats, n: int, seed: int,
                    prefix_pool: int = 8) -> list[TraceRequest]:
    """`n` requests drawn from `stats` with `random.Random(seed)`.

    Arrivals: Poisson; with a peak above the mean, on/off — `burst_s` at the peak rate, then
    `burst_s * (1 - f) / f` at the calm rate that keeps the mean (f = `BURST_FRACTION`; floored
    at 5% of the mean), starting with a burst. Prompt and output lengths by inverse CDF of the
    quantiles. With a prefix hit ratio h, the first floor(h * prompt / 512) blocks of a prompt
    are one of `prefix_pool` shared prefixes (they hit once seen), the rest unique."""
    rng = random.Random(seed)
    mean, peak = stats.arrival_rate_rps, max(stats.peak_rate_rps, stats.arrival_rate_rps)
    f = BURST_FRACTION
    calm = max((mean - f * peak) / (1 - f), 0.05 * mean) if peak > mean else mean
    phases = ((peak, stats.burst_s), (calm, stats.burst_s * (1 - f) / f))
    phase, phase_end = 0, phases[0][1]
    out: list[TraceRequest] = []
    t = 0.0
    next_id = 1 << 32
    for i in range(n):
        n_in = _inverse_cdf(stats.prompt_tokens, rng.random())
        n_out = _inverse_cdf(stats.output_tokens, rng.random())
        blocks = math.ceil(n_in / TRACE_BLOCK_TOKENS)
        shared = min(blocks, int(stats.prefix_hit_ratio * n_in / TRACE_BLOCK_TOKENS))
        doc = rng.randrange(prefix_pool)
        ids = tuple(doc * 100_000 + j for j in range(shared))
        ids += tuple(range(next_id, next_id + blocks - shared))
        next_id += blocks - shared
        out.append(TraceRequest(f"s{i}", t, n_in, n_out, ids))
        t += rng.expovariate(phases[phase][0])
        while t > phase_end:  # memoryless: restart the gap at the boundary at the new rate
            t = phase_end + rng.expovariate(phases[1 - phase][0])
            phase = 1 - phase
            phase_end += phases[phase][1]
    return out
