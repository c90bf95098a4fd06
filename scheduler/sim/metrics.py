"""Figures of merit for a simulation run, and the trace's ideal prefix hit rate.

- hit rate: prompt tokens served from cache / prompt tokens, over admitted requests; the ideal is
  the same figure for one infinite cache that has seen every earlier request (`ideal_hit_rate`);
- TTFT p50/p99 over completed requests; ITL p50/p99 over all inter-token gaps (weighted by count);
- goodput: requests that completed with TTFT <= `ttft_slo_s` and mean ITL <= `itl_slo_s`, per
  second of makespan (first arrival to last completion); `slo_attainment` is their fraction of
  all requests (dropped and unfinished ones count as misses);
- imbalance: max / mean over workers of busy time, and of processed tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from meshd.scheduler.sim.records import RequestRecord
from meshd.scheduler.sim.sim import SimResult
from meshd.scheduler.sim.timing import EngineTiming
from meshd.scheduler.sim.trace import TraceRequest, block_hashes


def ideal_hit_rate(trace: Sequence[TraceRequest], block_size: int) -> float:
    """Hit rate with one infinite cache shared by all requests, computed from the trace alone.

    A request reuses its longest prefix of blocks seen in any earlier request, capped at
    `prompt - 1` tokens (one token is always computed), as the simulator's engines do.
    """
    seen: set[int] = set()
    hit = total = 0
    for r in trace:
        hashes = block_hashes(r, block_size)
        k = 0
        for h in hashes:
            if h not in seen:
                break
            k += 1
        hit += min(k * block_size, r.input_tokens - 1)
        total += r.input_tokens
        seen.update(hashes)
    return hit / total if total else 0.0


def feasible_fraction(trace: Sequence[TraceRequest], cost: EngineTiming, ttft_slo_s: float = 2.0,
                      itl_slo_s: float = 0.1) -> float:
    """Fraction of requests that could meet the SLO at all: alone on an idle worker, without a
    cache hit (a prompt whose bare prefill exceeds the TTFT target misses at any load)."""
    ok = sum(1 for r in trace if cost.prefill_s(r.input_tokens) <= ttft_slo_s
             and cost.decode_step_s(1, r.input_tokens + r.output_tokens) <= itl_slo_s)
    return ok / len(trace) if trace else 0.0


def weighted_percentile(values: Sequence[float], weights: Sequence[int], q: float) -> float:
    """The smallest value v such that at least `q` (0..1) of the total weight is <= v."""
    if not values:
        return math.nan
    v = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    order = np.argsort(v, kind="stable")
    cum = np.cumsum(w[order])
    i = int(np.searchsorted(cum, q * cum[-1], side="left"))
    return float(v[order][min(i, len(v) - 1)])


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else math.nan


def _ratio_max_mean(xs: list[float]) -> float:
    mean = sum(xs) / len(xs) if xs else 0.0
    return max(xs) / mean if mean > 0 else math.nan


@dataclass(frozen=True, slots=True)
class Summary:
    requests: int
    completed: int
    dropped: int
    hit_rate: float
    ideal_hit_rate: float
    hit_vs_ideal: float
    ttft_p50_s: float
    ttft_p99_s: float
    itl_p50_s: float
    itl_p99_s: float
    slo_attainment: float
    goodput_rps: float
    throughput_rps: float
    makespan_s: float
    imbalance_busy: float
    imbalance_tokens: float
    disaggregated_frac: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def meets_slo(r: RequestRecord, ttft_slo_s: float, itl_slo_s: float) -> bool:
    return r.done and r.ttft_s <= ttft_slo_s and r.mean_itl_s <= itl_slo_s


def summarize(result: SimResult, trace: Sequence[TraceRequest], ttft_slo_s: float = 2.0,
              itl_slo_s: float = 0.1) -> Summary:
    recs = result.records
    done = [r for r in recs if r.done]
    admitted = [r for r in recs if not r.dropped and not math.isnan(r.prefill_start_s)]
    prompt = sum(r.prompt_tokens for r in admitted)
    hit = sum(r.cached_tokens for r in admitted) / prompt if prompt else 0.0
    ideal = ideal_hit_rate(trace, result.block_size)
    gaps: list[float] = []
    counts: list[int] = []
    for r in done:
        for g, c in r.itl:
            gaps.append(g)
            counts.append(c)
    good = sum(1 for r in recs if meets_slo(r, ttft_slo_s, itl_slo_s))
    t0 = min((r.arrival_s for r in recs), default=0.0)
    t1 = max((r.end_s for r in done), default=t0)
    span = max(t1 - t0, 1e-9)
    stats = list(result.workers.values())
    return Summary(
        requests=len(recs), completed=len(done), dropped=sum(1 for r in recs if r.dropped),
        hit_rate=hit, ideal_hit_rate=ideal, hit_vs_ideal=hit / ideal if ideal > 0 else math.nan,
        ttft_p50_s=_pct([r.ttft_s for r in done], 50),
        ttft_p99_s=_pct([r.ttft_s for r in done], 99),
        itl_p50_s=weighted_percentile(gaps, counts, 0.5),
        itl_p99_s=weighted_percentile(gaps, counts, 0.99),
        slo_attainment=good / len(recs) if recs else 0.0,
        goodput_rps=good / span, throughput_rps=len(done) / span, makespan_s=span,
        imbalance_busy=_ratio_max_mean([s.busy_s for s in stats]),
        imbalance_tokens=_ratio_max_mean([float(s.prefill_tokens + s.decode_tokens)
                                          for s in stats]),
        disaggregated_frac=(sum(1 for r in done if r.disaggregated) / len(done)
                            if done else 0.0),
    )
