"""P/D ratio planner evaluation on the trace-driven simulator (8 workers by default).

    python benchmarks/planner.py            # ~1-2 minutes on 2 cores
    python benchmarks/planner.py --quick    # smoke (fewer requests)

1. Fixed splits vs the planner. For each workload — the shared Mooncake traces (conversation,
   synthetic) and a SYNTHETIC trace shaped like the Azure LLM inference *code* trace of 2023
   (prompts ~2k tokens, outputs ~30, bursty arrivals; generated seeded here, written to a temp
   CSV and loaded back through `sim.csv_trace`) — every fixed split (pP dD, p + d = n, and n
   colocated) replays the whole trace through the real Router (meshd profiles + P/D decider);
   goodput = requests with TTFT <= 2 s and mean ITL <= 100 ms per second of makespan (as
   `sim_compare`). The planner sees only the trace's `WorkloadStats` (rate, peak rate, length
   quantiles, ideal prefix-hit ratio) and picks a split from its own short seeded simulations;
   its goodput is that split's replay.
2. Shifting workload: a synthetic trace whose first part is code-like (2k/30 tokens, high rate)
   and second part long-prompt chat (8k/300 median, 12 r/s), cut into windows; the planner's
   `plan` per window (on a rolling window of stats) goes through the configured hysteresis
   and, for comparison, is adopted raw (no hysteresis: the fresh best of every window); both
   start from a colocated deployment; plan changes are counted for each, and each phase is
   replayed alone under every fixed split for reference.
Prints tables, writes benchmarks/results/planner.json. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from meshd.scheduler.planner import (
    Hysteresis,
    Plan,
    Planner,
    PlannerConfig,
    candidate_splits,
    split_label,
)
from meshd.scheduler.sim import ClusterConfig, Simulator, load_mooncake, summarize
from meshd.scheduler.sim.csv_trace import load_csv_trace, write_csv_trace
from meshd.scheduler.sim.metrics import ideal_hit_rate
from meshd.scheduler.sim.policies import build
from meshd.scheduler.sim.trace import TraceRequest
from meshd.scheduler.types import Role
from meshd.scheduler.workload_stats import WorkloadStats

_TRACE_DIR = Path(__file__).resolve().parents[2] / "shared" / "traces"
MOONCAKE = {"conversation": _TRACE_DIR / "conversation_trace.jsonl",
            "synthetic": _TRACE_DIR / "synthetic_trace.jsonl"}


def code_like(n: int, rate: float, seed: int, prompt: float = 1800.0, output: float = 18.0,
              t0: float = 0.0, tag: str = "a", max_in: int = 8192,
              max_out: int = 512) -> list[TraceRequest]:
    """SYNTHETIC, by default Azure-code-2023-shaped: lognormal prompts (median `prompt`, sigma
    0.7, 16..`max_in`) and outputs (median `output`, sigma 0.9, 1..`max_out`; mean ~27);
    arrivals from a two-state Markov-modulated Poisson process (calm 0.6x `rate` for ~10 s,
    bursts 2.2x for ~3 s; mean ~0.97x `rate`)."""
    rng = random.Random(seed)
    out: list[TraceRequest] = []
    t, burst, until = t0, False, t0 + rng.expovariate(1 / 10)
    for i in range(n):
        t += rng.expovariate(rate * (2.2 if burst else 0.6))
        while t > until:
            burst = not burst
            until += rng.expovariate(1 / (3 if burst else 10))
        n_in = min(max_in, max(16, round(rng.lognormvariate(math.log(prompt), 0.7))))
        n_out = min(max_out, max(1, round(rng.lognormvariate(math.log(output), 0.9))))
        out.append(TraceRequest(f"{tag}{i}", t, n_in, n_out))
    return out


def replay(trace: list[TraceRequest], split: tuple[int, int, int], cfg: PlannerConfig) -> dict:
    p, d, c = split
    roles = (Role.PREFILL,) * p + (Role.DECODE,) * d + (Role.BOTH,) * c
    cluster = ClusterConfig(roles=roles, cost=cfg.timing, kv_tokens=cfg.kv_tokens,
                            host_cache_tokens=cfg.host_cache_tokens)
    router, index = build("meshd")
    s = summarize(Simulator(cluster, router, index).run(trace), trace, cfg.ttft_s, cfg.itl_s)
    return {"split": split_label(split), "goodput_rps": s.goodput_rps,
            "slo_attainment": s.slo_attainment, "ttft_p99_s": s.ttft_p99_s,
            "itl_p99_s": s.itl_p99_s, "makespan_s": s.makespan_s}


def stats_of(trace: list[TraceRequest]) -> WorkloadStats:
    span = max(trace[-1].arrival_s - trace[0].arrival_s, 1e-9)
    return WorkloadStats.from_requests(trace, span, min(ideal_hit_rate(trace, 512), 0.95))


def evaluate(name: str, trace: list[TraceRequest], cfg: PlannerConfig) -> dict[str, Any]:
    rows = [replay(trace, s, cfg) for s in candidate_splits(cfg.total_workers)]
    stats = stats_of(trace)
    t0 = time.perf_counter()
    plan = Planner(cfg).plan(stats)
    plan_s = time.perf_counter() - t0
    by = {r["split"]: r for r in rows}
    best = max(rows, key=lambda r: r["goodput_rps"])
    chosen = by[plan.label]
    return {"workload": name, "requests": len(trace), "rate_rps": stats.arrival_rate_rps,
            "peak_rate_rps": stats.peak_rate_rps, "prefix_hit_ratio": stats.prefix_hit_ratio,
            "fixed": rows, "planner": plan.label, "planner_goodput_rps": chosen["goodput_rps"],
            "planner_predicted": plan.predicted_goodput, "plan_wall_s": plan_s,
            "reason": plan.reason, "best_fixed": best["split"],
            "best_fixed_goodput_rps": best["goodput_rps"],
            "colocated_goodput_rps": by[f"{cfg.total_workers}C"]["goodput_rps"],
            "predicted": {c.label: c.goodput for c in plan.candidates}}


def shift_trace(n_first: int, seed: int) -> tuple[list[TraceRequest], list[TraceRequest]]:
    first = code_like(n_first, 50.0, seed)
    second = code_like(n_first // 3, 12.0, seed + 1, prompt=8000.0, output=300.0,
                       t0=first[-1].arrival_s, tag="b", max_in=32768, max_out=2048)
    return first, second


def run_windows(cfg: PlannerConfig, trace: list[TraceRequest], t_mid: float, window_s: float,
                lookback_s: float) -> dict[str, Any]:
    """Every `window_s` the planner sees the stats of the last `lookback_s` seconds (a rolling
    window, as a gateway would keep); hysteresis and raw adoption both start colocated."""
    planner = Planner(cfg)
    with_h = Hysteresis(cfg.min_gain, cfg.confirm_windows, cfg.cooldown_windows, cfg.smoothing)
    with_h.seed((0, 0, cfg.total_workers))
    raw_changes, prev = 0, f"{cfg.total_workers}C"
    windows = []
    t, t_end = 0.0, trace[-1].arrival_s
    while t < t_end:
        lo, hi = max(0.0, t + window_s - lookback_s), t + window_s
        reqs = [r for r in trace if lo <= r.arrival_s < hi]
        if len(reqs) >= 2:
            t_plan = time.perf_counter()
            fresh: Plan = planner.plan(WorkloadStats.from_requests(reqs, hi - lo))
            plan_s = time.perf_counter() - t_plan
            a = with_h.step(fresh)
            raw_changes += int(fresh.label != prev)
            prev = fresh.label
            phase = "A" if t + window_s <= t_mid else ("B" if t >= t_mid else "A/B")
            windows.append({"start_s": t, "phase": phase, "stats_requests": len(reqs),
                            "fresh": fresh.label, "with": a.label, "plan_wall_s": plan_s,
                            "reason": a.reason})
        t += window_s
    return {"window_s": window_s, "lookback_s": lookback_s, "windows": windows,
            "changes_with_hysteresis": with_h.changes, "changes_without": raw_changes}


def shift(cfg: PlannerConfig, n_first: int, window_s: float, lookback_s: float,
          seed: int) -> dict[str, Any]:
    first, second = shift_trace(n_first, seed)
    t_mid = first[-1].arrival_s
    runs = [run_windows(cfg, first + second, t_mid, window_s, lb)
            for lb in dict.fromkeys((lookback_s, window_s))]
    phases = {}
    for name, part in (("A", first), ("B", [dataclasses.replace(r, arrival_s=r.arrival_s - t_mid)
                                           for r in second])):
        phases[name] = [replay(part, sp, cfg) for sp in candidate_splits(cfg.total_workers)]
    return {"runs": runs, "phase_fixed": phases, "shift_at_s": t_mid,
            "hysteresis": {"min_gain": cfg.min_gain, "confirm_windows": cfg.confirm_windows,
                           "cooldown_windows": cfg.cooldown_windows,
                           "smoothing": cfg.smoothing}}


def print_eval(e: dict[str, Any]) -> None:
    print(f"\n## {e['workload']}: {e['requests']} requests, {e['rate_rps']:.1f} r/s, "
          f"peak {e['peak_rate_rps']:.1f} r/s, prefix hit {e['prefix_hit_ratio']:.2f}")
    print("| split | goodput r/s | SLO ok | TTFT p99 s | ITL p99 ms | planner predicted |")
    print("|---|---|---|---|---|---|")
    for r in e["fixed"]:
        mark = " **planner**" if r["split"] == e["planner"] else ""
        print(f"| {r['split']}{mark} | {r['goodput_rps']:.2f} | {100 * r['slo_attainment']:.0f}% "
              f"| {r['ttft_p99_s']:.2f} | {1e3 * r['itl_p99_s']:.0f} | "
              f"{e['predicted'][r['split']]:.2f} |")
    print(f"planner {e['planner']} {e['planner_goodput_rps']:.2f} r/s "
          f"(plan() {e['plan_wall_s']:.2f} s); best fixed {e['best_fixed']} "
          f"{e['best_fixed_goodput_rps']:.2f}; colocated "
          f"{e['colocated_goodput_rps']:.2f}. {e['reason']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--requests", type=int, default=1600, help="per Mooncake trace")
    ap.add_argument("--load", type=float, default=1.0,
                    help="Mooncake per-worker load x: speedup = x * workers / 4 (sim_compare)")
    ap.add_argument("--window-s", type=float, default=10.0, help="planning cadence (shift)")
    ap.add_argument("--lookback-s", type=float, default=30.0,
                    help="stats over the last lookback_s seconds (shift)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-gain", type=float, default=0.10)
    ap.add_argument("--confirm-windows", type=int, default=3)
    ap.add_argument("--cooldown-windows", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/planner.json")
    a = ap.parse_args(argv)
    n_req = 300 if a.quick else a.requests
    cfg = PlannerConfig(total_workers=a.workers, seed=a.seed, min_gain=a.min_gain,
                        confirm_windows=a.confirm_windows, cooldown_windows=a.cooldown_windows)
    t0 = time.perf_counter()
    evals = []
    for name, path in MOONCAKE.items():
        trace = load_mooncake(path, speedup=a.load * a.workers / 4, limit=n_req)
        evals.append(evaluate(f"mooncake-{name}", trace, cfg))
        print_eval(evals[-1])
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "azure_code_like.csv"
        write_csv_trace(csv_path, code_like(n_req, 50.0, a.seed))
        evals.append(evaluate("azure-code-like (SYNTHETIC, via CSV)", load_csv_trace(csv_path),
                              cfg))
    print_eval(evals[-1])
    sh = shift(cfg, 600 if a.quick else 3000, a.window_s, a.lookback_s, a.seed)
    for run in sh["runs"]:
        print(f"\n## shifting workload (SYNTHETIC): code-like 2k/30 @50 r/s, then 8k/300 @12 "
              f"r/s from t={sh['shift_at_s']:.0f} s; plan every {run['window_s']:g} s on the "
              f"last {run['lookback_s']:g} s; both start from {a.workers}C")
        print("| t s | phase | reqs in stats | fresh plan (no hysteresis) | in force (hysteresis) "
              "|")
        print("|---|---|---|---|---|")
        for w in run["windows"]:
            print(f"| {w['start_s']:.0f} | {w['phase']} | {w['stats_requests']} | "
                  f"{w['fresh']} | {w['with']} |")
        print(f"plan changes: with hysteresis {run['changes_with_hysteresis']}, without "
              f"{run['changes_without']}; plan() max "
              f"{max(w['plan_wall_s'] for w in run['windows']):.2f} s")
    for name, rows in sh["phase_fixed"].items():
        cells = ", ".join(f"{r['split']} {r['goodput_rps']:.2f} ({100 * r['slo_attainment']:.0f}%)"
                          for r in rows)
        print(f"phase {name} replayed alone, goodput r/s (SLO ok) per fixed split: {cells}")
    wall = time.perf_counter() - t0
    print(f"\ntotal {wall:.1f} s")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(a), "planner": {
        "total_workers": cfg.total_workers, "ttft_s": cfg.ttft_s, "itl_s": cfg.itl_s,
        "goodput": cfg.goodput, "sample_requests": cfg.sample_requests},
        "evaluations": evals, "shift": sh, "wall_s": wall}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
