"""P/D ratio planner: how many of N workers should prefill, decode, or do both.

    planner = Planner(PlannerConfig(total_workers=8))
    plan = planner.plan(stats)         # best split for one window's stats, every candidate scored
    in_force = planner.observe(stats)  # the same through hysteresis: the split to run now

Pure: no I/O, no clock (time is counted in observation windows), deterministic for a seed.
Each candidate (pP dD for p + d = N, p, d >= 1, and N colocated) is scored by running the
trace-driven simulator (`meshd.scheduler.sim`: the real Router with meshd's profiles and P/D
decider) on one synthetic workload drawn from the window's `WorkloadStats` with a fixed seed —
the same requests for every candidate — so the prediction includes queueing, batching and KV
transfer, not a closed-form throughput. The step-time model is an input (`PlannerConfig.timing`,
`Planner.set_timing`; `timing_from_cost` maps the gateway's calibrated per-worker parameters).

Goodput (`PlannerConfig.goodput`): "rps" = sampled requests meeting TTFT <= ttft_s and mean
ITL <= itl_s per second of the sample's arrival span (offered rate x SLO attainment, the
DistServe notion: queueing that builds up under overload shows as misses); "attainment" = their
fraction. Unlike `sim.metrics.summarize` it does not divide by the makespan: on a sample of a
few hundred requests the drain of the last long outputs would dominate it. `slo_load` is the
90th percentile over requests of max(TTFT / ttft_s, mean ITL / itl_s) (a request meets the SLO
iff its figure is <= 1; unfinished ones count as inf). Ties (e.g. every split meets the SLO) go
to the larger margin (lower `slo_load`), then candidate order (colocated first).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from meshd.scheduler.cost_model import CostModel
from meshd.scheduler.sim.cluster import DEFAULT_KV_TOKENS, ClusterConfig
from meshd.scheduler.sim.metrics import summarize
from meshd.scheduler.sim.policies import build
from meshd.scheduler.sim.sim import Simulator
from meshd.scheduler.sim.timing import EngineTiming, h100_llama3_8b
from meshd.scheduler.sim.trace import TraceRequest
from meshd.scheduler.types import Role
from meshd.scheduler.workload_stats import WorkloadStats, sample_workload

GOODPUTS = ("rps", "attainment")
Split = tuple[int, int, int]  # (n_prefill, n_decode, n_colocated)


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    """`total_workers` to divide; the SLO (`ttft_s`, `itl_s`: mean inter-token gap per request)
    and `goodput` metric (see the module docstring); hysteresis: a new plan must predict at
    least `min_gain` (relative) more goodput than the plan in force for `confirm_windows`
    consecutive windows, none of them within `cooldown_windows` windows of the last change;
    `smoothing` is the weight of the newest window in each candidate's smoothed goodput;
    `sample_requests` synthetic requests per candidate (seeded by `seed`); the simulated
    workers' `timing`, KV capacity and host prefix-cache tier."""

    total_workers: int
    ttft_s: float = 2.0
    itl_s: float = 0.1
    goodput: str = "rps"
    min_gain: float = 0.10
    confirm_windows: int = 3
    cooldown_windows: int = 5
    smoothing: float = 1.0
    sample_requests: int = 300
    seed: int = 0
    timing: EngineTiming = field(default_factory=h100_llama3_8b)
    kv_tokens: int = DEFAULT_KV_TOKENS
    host_cache_tokens: int = 0

    def __post_init__(self) -> None:
        if self.total_workers < 1:
            raise ValueError(f"planner.total_workers: must be >= 1, got {self.total_workers}")
        for name in ("ttft_s", "itl_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"planner.{name}: must be > 0, got {getattr(self, name)}")
        if self.goodput not in GOODPUTS:
            raise ValueError(f"planner.goodput: must be one of {', '.join(GOODPUTS)}, "
                             f"got {self.goodput!r}")
        if not self.min_gain >= 0:
            raise ValueError(f"planner.min_gain: must be >= 0, got {self.min_gain}")
        if self.confirm_windows < 1:
            raise ValueError(f"planner.confirm_windows: must be >= 1, got {self.confirm_windows}")
        if self.cooldown_windows < 0:
            raise ValueError(f"planner.cooldown_windows: must be >= 0, "
                             f"got {self.cooldown_windows}")
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"planner.smoothing: must be in (0, 1], got {self.smoothing}")
        if self.sample_requests < 10:
            raise ValueError(f"planner.sample_requests: must be >= 10, "
                             f"got {self.sample_requests}")
        if self.kv_tokens < 512:
            raise ValueError(f"planner.kv_tokens: must be >= 512, got {self.kv_tokens}")
        if self.host_cache_tokens < 0:
            raise ValueError(f"planner.host_cache_tokens: must be >= 0, "
                             f"got {self.host_cache_tokens}")


class CandidateScore(NamedTuple):
    """One split's predicted figures on the window's synthetic workload."""

    n_prefill: int
    n_decode: int
    n_colocated: int
    goodput: float  # in the configured metric
    attainment: float
    ttft_p99_s: float
    itl_p99_s: float
    slo_load: float  # p90 over requests of max(TTFT / ttft_s, mean ITL / itl_s)

    @property
    def split(self) -> Split:
        return (self.n_prefill, self.n_decode, self.n_colocated)

    @property
    def label(self) -> str:
        return split_label(self.split)


class Plan(NamedTuple):
    """A split to run, its predicted goodput, every candidate considered and why this one."""

    n_prefill: int
    n_decode: int
    n_colocated: int
    predicted_goodput: float
    candidates: tuple[CandidateScore, ...]
    reason: str

    @property
    def split(self) -> Split:
        return (self.n_prefill, self.n_decode, self.n_colocated)

    @property
    def label(self) -> str:
        return split_label(self.split)

    def score_of(self, split: Split) -> CandidateScore | None:
        return next((c for c in self.candidates if c.split == split), None)


def split_label(split: Split) -> str:
    """"3P5D", "8C", "2P4D2C"."""
    p, d, c = split
    return "".join(f"{n}{k}" for n, k in ((p, "P"), (d, "D"), (c, "C")) if n) or "0"


def candidate_splits(total: int) -> list[Split]:
    """All colocated first, then pP dD for p = 1 .. total - 1."""
    return [(0, 0, total)] + [(p, total - p, 0) for p in range(1, total)]


def timing_from_cost(params: Mapping[str, float], base: EngineTiming,
                     typical_prompt_tokens: int = 8192) -> EngineTiming:
    """`base` with the coefficients the gateway's cost parameters (`cost_model.CostModel`
    keys, ms; e.g. `Calibration.published` or `[gateway.routing] cost`) measure replaced: the
    inverse of `EngineTiming.view_params`. A measured `prefill_ms_per_token` scales the linear
    and attention prefill terms together so that their per-token cost at
    `typical_prompt_tokens` equals it; `queue_ms_per_waiting` is ignored (the simulator queues).
    Unknown keys raise `ValueError`."""
    CostModel.from_params(params)  # validates the keys
    out = base
    if "prefill_ms_per_token" in params:
        cur = base.prefill_s_per_token + base.attn_s_per_token_pair * typical_prompt_tokens / 2
        want = params["prefill_ms_per_token"] / 1e3
        f = want / cur if cur > 0 else 0.0
        lin = base.prefill_s_per_token * f if cur > 0 else want
        out = dataclasses.replace(out, prefill_s_per_token=lin,
                                  attn_s_per_token_pair=base.attn_s_per_token_pair * f)
    scale = {"prefill_fixed_ms": ("prefill_overhead_s", 1e-3),
             "decode_base_ms": ("decode_overhead_s", 1e-3),
             "decode_ms_per_seq": ("decode_s_per_seq", 1e-3),
             "decode_ms_per_kctx": ("decode_s_per_ctx_token", 1e-6)}
    updates = {name: params[key] * k for key, (name, k) in scale.items() if key in params}
    return dataclasses.replace(out, **updates)


def median_cost(per_worker: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per key, the median over the workers that report it (one cluster-wide model)."""
    keys = sorted({k for p in per_worker for k in p})
    return {k: statistics.median(p[k] for p in per_worker if k in p) for k in keys}


@dataclass(slots=True)
class Hysteresis:
    """Which plan is in force, given one fresh `Plan` per window (`step`).

    Every candidate's predicted goodput is smoothed over windows (exponentially, weight
    `smoothing` on the newest; 1 = none), so a split that wins in most windows of a regime
    shows it even when single windows are noisy. The first plan is adopted at once. After that
    the best smoothed split replaces the one in force only when, for `confirm_windows`
    consecutive windows, its smoothed goodput exceeds `1 + min_gain` times the in-force split's
    and it does not predict less than the in-force split in the window itself (the challenger
    may change from window to window; the latest is adopted), and none of those windows falls
    within `cooldown_windows` windows of the last change (they do not count and
    reset the streak). `seed` starts from a running deployment instead (no cooldown); without it
    the first fresh plan is adopted and starts one. `changes` counts adoptions after that."""

    min_gain: float
    confirm_windows: int
    cooldown_windows: int
    smoothing: float = 1.0
    in_force: Plan | None = None
    streak: int = 0
    since_change: int = 0
    changes: int = 0
    smoothed: dict[Split, float] = field(default_factory=dict)

    def step(self, fresh: Plan) -> Plan:
        """The plan in force after this window: its split, re-scored by `fresh`, with why."""
        for c in fresh.candidates:
            old = self.smoothed.get(c.split)
            self.smoothed[c.split] = c.goodput if old is None else (
                old + self.smoothing * (c.goodput - old))
        cur = self.in_force
        if cur is None:
            self.in_force = fresh._replace(reason=f"initial: {fresh.reason}")
            return self.in_force
        self.since_change += 1
        best = max(fresh.candidates, key=lambda c: self.smoothed[c.split])
        have = self.smoothed.get(cur.split, 0.0)
        top = self.smoothed[best.split]
        pct = f"+{100 * (top / have - 1):.0f}%" if have > 0 else "from no goodput"
        label = best.label
        now_best, now_cur = best.goodput, self._fresh(fresh, cur.split)
        if best.split == cur.split or not top > have * (1 + self.min_gain):
            self.streak = 0
            if best.split == cur.split:
                why = "still best"
            elif top <= 0:  # nothing meets the SLO: no split gains on another
                why = f"no split has goodput (best {label}: 0)"
            else:
                why = f"best {label} {pct} < min gain {100 * self.min_gain:.0f}%"
        elif now_best < now_cur:
            self.streak = 0
            why = f"{label} leads smoothed ({pct}) but trails in this window"
        elif self.since_change <= self.cooldown_windows:
            self.streak = 0
            why = (f"{label} {pct} but in cooldown "
                   f"({self.cooldown_windows - self.since_change + 1} windows left)")
        else:
            self.streak += 1
            if self.streak >= self.confirm_windows:
                self.changes += 1
                self.streak, self.since_change = 0, 0
                self.in_force = Plan(*best.split, best.goodput, fresh.candidates,
                                     f"adopted {label} over {cur.label}: {pct} "
                                     f"(smoothed) for {self.confirm_windows} windows")
                return self.in_force
            why = f"{label} {pct} ({self.streak}/{self.confirm_windows} windows)"
        return cur._replace(predicted_goodput=now_cur, candidates=fresh.candidates,
                            reason=f"kept {cur.label}: {why}")

    def seed(self, split: Split) -> None:
        """Start from the deployment already running (`split`), outside any cooldown."""
        self.in_force = Plan(*split, 0.0, (), "deployed")
        self.since_change = self.cooldown_windows

    @staticmethod
    def _fresh(fresh: Plan, split: Split) -> float:
        mine = fresh.score_of(split)
        return mine.goodput if mine is not None else 0.0


class Planner:
    """`plan` scores candidates for one window (no state); `observe` adds hysteresis (state: the
    plan in force, the win streak, windows since the last change — see `Hysteresis`)."""

    def __init__(self, config: PlannerConfig, deployed: Split | None = None) -> None:
        """`deployed`: the split running now (the plan in force until hysteresis changes it)."""
        self.config = config
        self.timing = config.timing
        self.hysteresis = Hysteresis(config.min_gain, config.confirm_windows,
                                     config.cooldown_windows, config.smoothing)
        if deployed is not None:
            if sum(deployed) != config.total_workers or min(deployed) < 0:
                raise ValueError(f"deployed: {deployed} must be >= 0 and sum to "
                                 f"total_workers={config.total_workers}")
            self.hysteresis.seed(deployed)

    def set_timing(self, timing: EngineTiming) -> None:
        """Use `timing` (e.g. `timing_from_cost(median_cost(calibrated), base)`) from now on."""
        self.timing = timing

    def evaluate(self, stats: WorkloadStats, split: Split) -> CandidateScore:
        """Simulate `split` on the window's seeded synthetic workload."""
        return self._score(self.sample(stats), split)

    def sample(self, stats: WorkloadStats) -> list[TraceRequest]:
        """The synthetic workload every candidate of this window runs."""
        return sample_workload(stats, self.config.sample_requests, self.config.seed)

    def _score(self, trace: Sequence[TraceRequest], split: Split) -> CandidateScore:
        cfg = self.config
        p, d, c = split
        roles = (Role.PREFILL,) * p + (Role.DECODE,) * d + (Role.BOTH,) * c
        cluster = ClusterConfig(roles=roles, cost=self.timing, kv_tokens=cfg.kv_tokens,
                                host_cache_tokens=cfg.host_cache_tokens)
        router, index = build("meshd")
        result = Simulator(cluster, router, index).run(trace)
        s = summarize(result, trace, cfg.ttft_s, cfg.itl_s)
        span = max(trace[-1].arrival_s - trace[0].arrival_s, 1e-9)
        good = s.slo_attainment * len(trace) / span if cfg.goodput == "rps" else s.slo_attainment
        loads = sorted(max(r.ttft_s / cfg.ttft_s, r.mean_itl_s / cfg.itl_s) if r.done
                       else math.inf for r in result.records)
        load = loads[min(len(loads) - 1, int(0.9 * len(loads)))]
        return CandidateScore(p, d, c, good, s.slo_attainment, s.ttft_p99_s, s.itl_p99_s,
                              load if not math.isnan(load) else math.inf)

    def plan(self, stats: WorkloadStats) -> Plan:
        """The best candidate for `stats` (ties: module docstring)."""
        trace = self.sample(stats)
        scores = tuple(self._score(trace, s)
                       for s in candidate_splits(self.config.total_workers))
        best = max(scores, key=lambda c: (c.goodput, -c.slo_load))
        ranked = sorted(scores, key=lambda c: -c.goodput)
        runner = next((c for c in ranked if c.split != best.split), None)
        why = (f"best predicted goodput {best.goodput:.3g} ({100 * best.attainment:.0f}% in SLO, "
               f"SLO load {best.slo_load:.2f})")
        if runner is not None:
            why += f"; next {runner.label} {runner.goodput:.3g} (SLO load {runner.slo_load:.2f})"
        return Plan(*best.split, best.goodput, scores, why)

    def observe(self, stats: WorkloadStats) -> Plan:
        """`plan(stats)` through the hysteresis: the plan in force after this window."""
        return self.hysteresis.step(self.plan(stats))


__all__ = ["CandidateScore", "Hysteresis", "Plan", "Planner", "PlannerConfig", "WorkloadStats",
           "candidate_splits", "median_cost", "sample_workload", "split_label",
           "timing_from_cost"]
