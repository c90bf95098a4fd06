"""Routing benchmarks: decision latency with a large index, KV event ingestion rate.

    python benchmarks/routing.py [--quick]

Prints a table and writes benchmarks/results/routing.json. Targets (not asserted): decision
p99 <= 50 us with 64 workers and 1M indexed blocks; ingestion >= 1M block events/s on one core.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from pathlib import Path

from meshd.scheduler.kv_events import (
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    decode_batch,
    encode_batch,
)
from meshd.scheduler.pd import PDDecider
from meshd.scheduler.prefix_index import PrefixIndex
from meshd.scheduler.profiles import builtin
from meshd.scheduler.router import Router
from meshd.scheduler.types import RequestView, Role, WorkerView

CHAIN = 64  # blocks per cached document prefix


def make_chains(n: int, rng: random.Random) -> list[tuple[int, ...]]:
    return [tuple(rng.getrandbits(64) for _ in range(CHAIN)) for _ in range(n)]


def build_index(workers: int, total_blocks: int, chains: list[tuple[int, ...]],
                rng: random.Random) -> PrefixIndex:
    index = PrefixIndex()
    per_worker = total_blocks // workers // CHAIN
    for w in range(workers):
        for chain in rng.sample(chains, per_worker):
            index.apply_events(f"w{w:02d}", [BlockStored(chain, None, (), 16)])
    return index


def make_workers(n: int, rng: random.Random) -> list[WorkerView]:
    out = []
    for i in range(n):
        role = Role.PREFILL if i % 4 == 0 else Role.DECODE
        out.append(WorkerView(f"w{i:02d}", role, "m", num_running=rng.randint(0, 64),
                              num_waiting=rng.randint(0, 6), kv_usage=rng.random(),
                              kv_capacity_blocks=20000, experts=frozenset()))
    return out


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def bench_decide(n_workers: int, n_blocks: int, n_req: int) -> dict[str, float]:
    rng = random.Random(0)
    chains = make_chains(max(64, n_blocks // CHAIN // 8), rng)
    t0 = time.perf_counter()
    index = build_index(n_workers, n_blocks, chains, rng)
    build_s = time.perf_counter() - t0
    workers = make_workers(n_workers, rng)
    router = Router(builtin("decode"), builtin("prefill"), PDDecider(), index)
    reqs = []
    for i in range(n_req):
        tail = tuple(rng.getrandbits(64) for _ in range(64))
        hashes = rng.choice(chains) + tail  # 128 blocks: 2,048-token prompts
        reqs.append(RequestView(f"r{i}", "m", len(hashes) * 16, hashes))
    lat: list[float] = []
    match_lat: list[float] = []
    gc.disable()
    for req in reqs:
        t = time.perf_counter_ns()
        index.match(req.block_hashes)
        t1 = time.perf_counter_ns()
        router.decide(req, workers)
        lat.append((time.perf_counter_ns() - t1) / 1000)
        match_lat.append((t1 - t) / 1000)
    gc.enable()
    return {"workers": n_workers, "indexed_blocks": index.num_blocks(),
            "index_build_s": round(build_s, 2), "requests": n_req,
            "decide_p50_us": round(pct(lat, 50), 1), "decide_p99_us": round(pct(lat, 99), 1),
            "match_p50_us": round(pct(match_lat, 50), 1),
            "match_p99_us": round(pct(match_lat, 99), 1)}


def bench_ingest(n_batches: int, blocks_per_event: int) -> dict[str, float]:
    """Steady state: each batch stores a chain of new blocks and evicts an old one."""
    rng = random.Random(1)
    batches, payloads = [], []
    live: list[tuple[int, ...]] = []
    for seq in range(n_batches):
        chain = tuple(rng.getrandbits(64) for _ in range(blocks_per_event))
        evs: list[BlockStored | BlockRemoved] = [BlockStored(chain, None, (), 16)]
        live.append(chain)
        if len(live) > 256:
            evs.append(BlockRemoved(live.pop(0)))
        b = KVEventBatch(seq, 0.0, tuple(evs))
        batches.append(b)
        payloads.append(encode_batch(b, "map"))
    n_events = sum(b.num_block_events() for b in batches)
    out: dict[str, float] = {"batches": n_batches, "blocks_per_event": blocks_per_event,
                             "block_events": n_events}
    for label, decode in (("apply", False), ("decode_apply", True)):
        index = PrefixIndex()
        index.add_worker("w")
        gc.disable()
        t = time.perf_counter()
        if decode:
            for seq, p in enumerate(payloads):
                index.apply_batch("w", decode_batch(seq, p))
        else:
            for b in batches:
                index.apply_batch("w", b)
        dt = time.perf_counter() - t
        gc.enable()
        out[f"{label}_events_per_s"] = round(n_events / dt)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    args = ap.parse_args()
    blocks, reqs, batches = (100_000, 2_000, 2_000) if args.quick else (1_000_000, 20_000, 20_000)
    decide = bench_decide(64, blocks, reqs)
    ingest = [bench_ingest(batches, n) for n in (16, 64)]
    print(f"{'metric':<34}{'value':>14}")
    for k, v in decide.items():
        print(f"{k:<34}{v:>14}")
    for res in ingest:
        for k in ("apply_events_per_s", "decode_apply_events_per_s"):
            print(f"{k + ' (' + str(res['blocks_per_event']) + '/event)':<34}{res[k]:>14,}")
    out = Path(__file__).parent / "results" / "routing.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"decide": decide, "ingest": ingest,
                               "targets": {"decide_p99_us": 50, "events_per_s": 1_000_000}},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
