"""MoE expert-aware routing, live and simulated, on the same setup.

    python benchmarks/moe_routing.py [--prompts 24] [--max-tokens 4] [--sim-only]

Setup: the built-in tiny MoE model (8 experts, top-2, 4 layers) on real engine processes, one
prefill worker p0 and two decode workers, dA hosting experts 0-3 and dB 4-7 (the agent's
`[workers] experts = ["*", "0-3", "4-7"]`). A separate worker is asked first which experts each
prompt activates (the rise of its `meshd_engine_moe_expert_tokens` counters) and what its
prefill answer reports (`meshd.experts`, the top 4 with token counts).

Live: each prompt once through the real gateway (one at a time), with meshd's decode profile
(prefix + load + SLO + expert affinity) and with the same profile without the expert scorer
(the ablation), each on fresh engines. (A round-robin baseline would be misleading live: the
choice run decides twice per disaggregated request, before and after the prefill's expert
signal, so a stateful picker advances twice.)
Simulated: the same prompts (lengths, output tokens, the reported expert counts) through
`meshd.scheduler.sim` on the same cluster shape and placement, one per second (sequential).
Hit = the request was decoded on the worker hosting most of its activated expert tokens
(`scheduler.sim.moe.best_workers`; ties count for both); "top-4 hit" judges by the experts the
router was told instead, "clear signal" only over prompts with >= 60% of those on one side.
meshd also runs live with cost calibration off (`[gateway.routing] calibrate_cost = false`).
Prints a table, writes benchmarks/results/moe_routing.json. Everything runs on this machine's
CPU; measures, asserts nothing. First it prints the simulator's synthetic MoE sweep
(`sim_sweep`, docs/simulator.md), which takes about a second.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test harness starts the real engine processes

from support.mesh import engines  # noqa: E402
from support.moe import MODEL, MOE_FLAGS, generated, members, probe  # noqa: E402

from meshd.scheduler.pd import PDConfig, PDDecider  # noqa: E402
from meshd.scheduler.prefix_index import PrefixIndex  # noqa: E402
from meshd.scheduler.profiles import builtin  # noqa: E402
from meshd.scheduler.router import Router  # noqa: E402
from meshd.scheduler.sim import ClusterConfig, Simulator, TraceRequest  # noqa: E402
from meshd.scheduler.sim.moe import best_workers  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
LOW, HIGH = frozenset(range(4)), frozenset(range(4, 8))
PLACEMENT = {"dA": LOW, "dB": HIGH}
WORDS = ["apple", "Bright kettle", "cat nap", "Delta wing", "echo", "Fable", "granite",
         "Harbor light", "ink well", "Jazz", "kite string", "Lorem ipsum", "moss", "Neon sign",
         "orbit", "Pepper", "quantum", "River bend", "stone", "Tiger lily", "umbra", "Velvet",
         "winter", "Xylophone", "yarn", "Zebra", "0000", "1234567", "~~~###", "!!??.."]


def make_prompts(n: int) -> list[str]:
    if not 1 <= n <= len(WORDS):
        raise SystemExit(f"--prompts: 1..{len(WORDS)}")
    return [(w + " ") * max(2, 48 // (len(w) + 1)) for w in WORDS[:n]]  # ~48 bytes each


def decode_profile(policy: str) -> Any:
    """meshd's built-in decode profile, or (`without_expert`) the same minus expert affinity."""
    from meshd.scheduler.profiles import BUILTIN, build_profile

    spec = dict(BUILTIN["decode"])
    if policy == "without_expert":
        spec["scorers"] = [s for s in spec["scorers"] if s["type"] != "expert"]
    return build_profile(spec, policy)


async def live(prompts: list[str], max_tokens: int, policy: str, calibrate: bool,
               tmp: Path) -> list[str]:
    """The decode worker of each prompt through a real gateway with `policy`'s decode pick
    (`calibrate`: the SLO scorer's cost measured from each worker's histograms, the default)."""
    import openai
    from support.mesh import gateway

    with engines([("p0", "prefill"), ("dA", "decode"), ("dB", "decode")], tmp,
                 extra=MOE_FLAGS) as mesh:
        decoders = [e for e in mesh if e.worker.role == "decode"]
        async with gateway(members(mesh, PLACEMENT)) as (url, handler):
            handler.router.decode = decode_profile(policy)
            handler.pool.routing = dataclasses.replace(handler.pool.routing,
                                                       calibrate_cost=calibrate)
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            out = []
            for p in prompts:
                before = [generated(e) for e in decoders]
                await client.completions.create(model=MODEL, prompt=p, max_tokens=max_tokens,
                                                temperature=0)
                grew = [e.worker.worker_id for e, b in zip(decoders, before, strict=True)
                        if generated(e) > b]
                out.append(grew[0] if len(grew) == 1 else "?")
            return out


def simulate(prompts: list[str], reported: list[dict[int, int]], max_tokens: int,
             policy: str) -> list[str]:
    trace = [TraceRequest(f"r{i}", float(i), len(p.encode()) + 1, max_tokens,
                          experts=tuple(sorted(rep.items())))
             for i, (p, rep) in enumerate(zip(prompts, reported, strict=True))]
    cluster = ClusterConfig.disaggregated(1, 2, block_size=16, kv_tokens=4096,
                                          experts=(LOW | HIGH, LOW, HIGH))
    index = PrefixIndex()  # as the live gateway's router (tests/support/mesh.py): P/D from 0
    router = Router(decode=decode_profile(policy), prefill=builtin("prefill"),
                    pd=PDDecider(PDConfig(min_uncached_tokens=0)), index=index)
    result = Simulator(cluster, router, index).run(trace)
    names = {"w01": "dA", "w02": "dB"}
    return [names.get(r.decode_worker, "?") for r in result.records]


def hits(served: list[str], experts: list[dict[int, int]]) -> int:
    return sum(s in best_workers(e, PLACEMENT) for s, e in zip(served, experts, strict=True))


def clear(reported: dict[int, int], margin: float = 0.6) -> bool:
    """The router's signal is decisive: >= `margin` of the reported tokens on one side."""
    low = sum(n for e, n in reported.items() if e in LOW) / max(sum(reported.values()), 1)
    return low >= margin or low <= 1 - margin


def row(policy: str, where: str, served: list[str], activated: list[dict[int, int]],
        reported: list[dict[int, int]]) -> dict[str, Any]:
    decisive = [i for i, r in enumerate(reported) if clear(r)]
    return {"policy": policy, "where": where, "requests": len(served),
            "hits": hits(served, activated), "top4_hits": hits(served, reported),
            "clear": len(decisive),
            "clear_hits": hits([served[i] for i in decisive], [reported[i] for i in decisive]),
            "on_dA": served.count("dA"), "served": served}


def sweep_router(policy: str) -> tuple[Any, PrefixIndex | None]:
    from meshd.scheduler.sim.policies import build

    if policy == "without_expert":
        index = PrefixIndex()
        return Router(decode=decode_profile(policy), prefill=builtin("prefill"),
                      pd=PDDecider(), index=index), index
    return build(policy)


def sim_sweep(rates: list[float], requests: int) -> list[dict[str, Any]]:
    """The simulator's MoE scenario (docs/simulator.md): 1 prefill + 2 decode H100-modelled
    workers, dA (w01) hosting experts 0-3 and dB (w02) 4-7; synthetic requests on 2 topics
    whose tokens go 80% to that half's experts; a uniform, then an 80/20 topic mix. Policies:
    round-robin and least-loaded (colocated on the decode pick), meshd with and without the
    expert scorer (P/D on the same decider)."""
    from meshd.scheduler.sim import summarize
    from meshd.scheduler.sim.moe import expert_hits, moe_trace

    cluster = ClusterConfig.disaggregated(1, 2, experts=(LOW | HIGH, LOW, HIGH))
    out = []
    for mix, weights in (("50/50", (1.0, 1.0)), ("80/20", (0.8, 0.2))):
        for rate in rates:
            trace = moe_trace(requests, rate, topics=2, hot_experts=4, topic_weights=weights)
            for policy in ("round_robin", "least_loaded", "without_expert", "meshd"):
                router, index = sweep_router(policy)
                result = Simulator(cluster, router, index).run(trace)
                s = summarize(result, trace)
                h = expert_hits(result, trace, cluster)
                on_a = sum(r.decode_worker == "w01" for r in result.records) / len(trace)
                out.append({"mix": mix, "rate_rps": rate, "policy": policy, "hit": h.rate,
                            "on_dA": on_a, "ttft_p99_s": s.ttft_p99_s, "itl_p99_s": s.itl_p99_s,
                            "slo_attainment": s.slo_attainment})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--out", default=str(RESULTS / "moe_routing.json"))
    ap.add_argument("--sim-only", action="store_true", help="only the simulator's sweep")
    args = ap.parse_args()
    sweep = sim_sweep([2.0, 8.0, 20.0], 400)
    print("| topic mix | rate r/s | policy | expert hit | on dA | TTFT p99 s | ITL p99 ms | "
          "SLO ok |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sweep:
        print(f"| {r['mix']} | {r['rate_rps']:g} | {r['policy']} | {r['hit']:.2f} | "
              f"{r['on_dA']:.2f} | {r['ttft_p99_s']:.2f} | {1e3 * r['itl_p99_s']:.0f} | "
              f"{r['slo_attainment']:.0%} |")
    if args.sim_only:
        return
    print()
    prompts = make_prompts(args.prompts)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        with engines([("probe", "both")], tmp, extra=MOE_FLAGS) as [worker]:
            probes = [probe(worker, p) for p in prompts]
        activated = [pr.activated for pr in probes]
        reported = [pr.reported for pr in probes]
        rows: list[dict[str, Any]] = []
        for policy, calibrate, sim in (("meshd", True, True), ("meshd", False, False),
                                       ("without_expert", True, True)):
            sub = tmp / f"{policy}-{calibrate}"
            sub.mkdir()
            served = asyncio.run(live(prompts, args.max_tokens, policy, calibrate, sub))
            where = "live" if calibrate else "live, cost not calibrated"
            rows.append(row(policy, where, served, activated, reported))
            if sim:
                served = simulate(prompts, reported, args.max_tokens, policy)
                rows.append(row(policy, "sim", served, activated, reported))
    print("| policy | where | requests | hit | top-4 hit | top-4 hit, clear signal | "
          "on dA / dB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        n = r["requests"]
        print(f"| {r['policy']} | {r['where']} | {n} | {r['hits'] / n:.2f} | "
              f"{r['top4_hits'] / n:.2f} | {r['clear_hits']}/{r['clear']} | "
              f"{r['on_dA']} / {n - r['on_dA']} |")
    for live_row in rows[0], rows[2]:
        agree = sum(a == b for a, b in zip(live_row["served"], rows[1]["served"], strict=True))
        print(f"meshd {live_row['where']} vs sim: same decode worker for {agree}/{n} prompts")
    print(f"{time.perf_counter() - t0:.1f}s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"placement": {k: sorted(v) for k, v in PLACEMENT.items()},
                               "prompts": prompts, "activated": activated,
                               "reported": reported, "rows": rows, "sim_sweep": sweep},
                              indent=1))


if __name__ == "__main__":
    main()
