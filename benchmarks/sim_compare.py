"""Routing-policy comparison on the Mooncake traces with the trace-driven simulator.

    python benchmarks/sim_compare.py            # full sweep (a few minutes on 2 cores)
    python benchmarks/sim_compare.py --quick    # CI smoke (seconds)

For each trace, cluster size n and load x, the trace is replayed at `speedup = x * n / 4` (so
x is the per-worker load: x = 1 is the recorded rate on 4 workers) through round-robin,
least-loaded, the SGLang-like approximate tree and meshd's profile (prefix + load + SLO
headroom, P/D decider), all run by the real `meshd.scheduler` Router. Prints a table and writes
JSON (default benchmarks/results/sim_compare.json). "RR misses the SLO" at the first load where
fewer than `--attainment` of the *feasible* requests (those that meet the SLO alone on an idle
worker) meet TTFT <= 2 s and mean ITL <= 100 ms; goodput ratios to round-robin are given there,
and each policy's SLO capacity (the highest load it sustains at that attainment, interpolated).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from meshd.scheduler.sim import ClusterConfig, Simulator, load_mooncake, summarize
from meshd.scheduler.sim.metrics import feasible_fraction
from meshd.scheduler.sim.policies import POLICIES, build

_TRACE_DIR = Path(__file__).resolve().parents[2] / "shared" / "traces"  # beside the repository
TRACES = {"conversation": str(_TRACE_DIR / "conversation_trace.jsonl"),
          "synthetic": str(_TRACE_DIR / "synthetic_trace.jsonl")}
COLS = ("hit_rate", "hit_vs_ideal", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s",
        "slo_attainment", "goodput_rps", "imbalance_busy", "disaggregated_frac")


def run_one(args: tuple[str, str, int, float, int, int, int, str]) -> dict[str, Any]:
    trace_name, path, n, load, limit, host_cache, block_size, policy = args
    trace = load_mooncake(path, speedup=load * n / 4, limit=limit)
    router, index = build(policy)
    cluster = ClusterConfig.colocated(n, host_cache_tokens=host_cache, block_size=block_size)
    t0 = time.perf_counter()
    result = Simulator(cluster, router, index).run(trace)
    summary = summarize(result, trace)
    return {"trace": trace_name, "workers": n, "load": load, "policy": policy,
            "requests": len(trace), "wall_s": time.perf_counter() - t0,
            "truncated": result.truncated, "feasible": feasible_fraction(trace, cluster.cost),
            **summary.as_dict()}


def crossover(rows: list[dict[str, Any]], attainment: float) -> list[dict[str, Any]]:
    """Per (trace, n): the first load where round-robin misses the SLO, and goodput ratios."""
    out = []
    for key in sorted({(r["trace"], r["workers"]) for r in rows}):
        rr = sorted((r for r in rows if (r["trace"], r["workers"]) == key
                     and r["policy"] == "round_robin"), key=lambda r: r["load"])
        miss = next((r for r in rr if r["slo_attainment"] < attainment * r["feasible"]), None)
        if miss is None:
            out.append({"trace": key[0], "workers": key[1], "load": None})
            continue
        at = {r["policy"]: r for r in rows if (r["trace"], r["workers"]) == key
              and r["load"] == miss["load"]}
        base = max(miss["goodput_rps"], 1e-9)
        # No policy serves more than the feasible requests within SLO, so over about the same
        # makespan its goodput ratio to RR is at most feasible / RR's attainment.
        out.append({"trace": key[0], "workers": key[1], "load": miss["load"],
                    "rr_attainment": miss["slo_attainment"], "feasible": miss["feasible"],
                    "ratio_bound": miss["feasible"] / max(miss["slo_attainment"], 1e-9),
                    "goodput_vs_rr": {p: at[p]["goodput_rps"] / base for p in at}})
    return out


def capacity(rows: list[dict[str, Any]], attainment: float) -> list[dict[str, Any]]:
    """Per (trace, n, policy): the highest per-worker load x at which the policy still meets the
    SLO for `attainment` of the feasible requests, interpolated linearly between grid loads
    (None: misses at the lowest load; the top load when it never misses)."""
    out = []
    for key in sorted({(r["trace"], r["workers"], r["policy"]) for r in rows}):
        pts = sorted((r["load"], r["slo_attainment"] / max(r["feasible"], 1e-9)) for r in rows
                     if (r["trace"], r["workers"], r["policy"]) == key)
        cap: float | None = pts[-1][0]
        prev: tuple[float, float] | None = None
        for x, a in pts:
            if a < attainment:
                if prev is None:
                    cap = None
                else:
                    cap = prev[0] + (x - prev[0]) * (prev[1] - attainment) / (prev[1] - a)
                break
            prev = (x, a)
        out.append({"trace": key[0], "workers": key[1], "policy": key[2], "capacity": cap})
    return out


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| trace | n | load | policy | hit | hit/ideal | TTFT p50 | TTFT p99 | ITL p50 | "
            "ITL p99 | SLO ok | goodput r/s | imbal | P/D |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r['trace']} | {r['workers']} | {r['load']:g} | {r['policy']} | "
            f"{r['hit_rate']:.3f} | {r['hit_vs_ideal']:.2f} | {r['ttft_p50_s']:.2f} | "
            f"{r['ttft_p99_s']:.2f} | {1e3 * r['itl_p50_s']:.0f}ms | "
            f"{1e3 * r['itl_p99_s']:.0f}ms | "
            f"{100 * r['slo_attainment']:.0f}% | {r['goodput_rps']:.2f} | "
            f"{r['imbalance_busy']:.2f} | {100 * r['disaggregated_frac']:.0f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--traces", default="conversation,synthetic")
    ap.add_argument("--sizes", default="4,8,16", help="cluster sizes")
    ap.add_argument("--loads", default="0.25,0.5,0.75,1,1.5", help="per-worker loads x")
    ap.add_argument("--per-worker", type=int, default=400, help="requests per worker (limit)")
    ap.add_argument("--host-cache-tokens", type=int, default=2_000_000,
                    help="host-memory prefix cache per worker, tokens (0: HBM only)")
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--attainment", type=float, default=0.9)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/sim_compare.json")
    a = ap.parse_args(argv)
    if a.quick:
        a.traces, a.sizes, a.loads, a.per_worker = "conversation", "4", "0.5,1.5", 50
    jobs = [(t, TRACES[t], n, x, a.per_worker * n, a.host_cache_tokens, a.block_size, p)
            for t in a.traces.split(",") for n in map(int, a.sizes.split(","))
            for x in map(float, a.loads.split(",")) for p in a.policies.split(",")]
    t0 = time.perf_counter()
    if a.jobs > 1:
        with ProcessPoolExecutor(a.jobs) as ex:
            rows = list(ex.map(run_one, jobs))
    else:
        rows = [run_one(j) for j in jobs]
    cross = crossover(rows, a.attainment)
    caps = capacity(rows, a.attainment)
    print(table(rows))
    print()
    for c in cross:
        if c["load"] is None:
            print(f"{c['trace']} n={c['workers']}: round-robin meets the SLO at every load")
            continue
        ratios = ", ".join(f"{p} {v:.2f}x" for p, v in c["goodput_vs_rr"].items())
        print(f"{c['trace']} n={c['workers']}: RR misses at x={c['load']:g} "
              f"({100 * c['rr_attainment']:.0f}% ok of {100 * c['feasible']:.0f}% feasible, "
              f"ratio bound ~{c['ratio_bound']:.2f}x); goodput vs RR: {ratios}")
    print("\nSLO capacity (max per-worker load x meeting the SLO for "
          f"{100 * a.attainment:.0f}% of feasible requests), ratio to round-robin:")
    for key in sorted({(c["trace"], c["workers"]) for c in caps}):
        mine = {c["policy"]: c["capacity"] for c in caps if (c["trace"], c["workers"]) == key}
        rr = mine.get("round_robin")
        cells = ", ".join(
            f"{p} {'<min' if v is None else f'{v:.2f}'}"
            + (f" ({v / rr:.2f}x)" if v is not None and rr else "") for p, v in mine.items())
        print(f"{key[0]} n={key[1]}: {cells}")
    print(f"\n{len(rows)} runs in {time.perf_counter() - t0:.1f}s")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(a), "rows": rows, "crossover": cross,
                                "capacity": caps}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
