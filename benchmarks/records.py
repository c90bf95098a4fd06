"""Request record store costs (issue 13 §2), in process: what the gateway's event loop spends
per request in `RecordStore.add` (buffer append under a lock, no I/O), and what the flush thread
spends per record in `flush` (one transaction: the raw rows, the hourly rollups they fall into,
then retention), into a fresh file (WAL, synchronous=NORMAL, as in production) and into one
that already holds `--prefill` rows.

    .venv/bin/python benchmarks/records.py [--rounds 5] [--n 10000] [--prefill 100000]

Records spread over 10 tenants x 5 models in one hour (50 rollup rows per flush). Median over
rounds of the mean µs per record: wall (perf_counter) and the calling thread's CPU. Writes
benchmarks/results/records.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshd.coordinator.gateway.records.store import RecordStore, RequestRecord, RetentionPolicy

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_800_000_000.0


def make_records(n: int, base: int = 0) -> list[RequestRecord]:
    return [RequestRecord(
        request_id=f"req-{base + i}", trace_id=f"{base + i:032x}", started_at=T0 + i % 3600,
        tenant=f"tenant-{i % 10}", model=f"model-{i % 5}", endpoint="chat",
        outcome="ok" if i % 20 else "error", status=200 if i % 20 else 502, mode="disaggregated",
        prompt_tokens=1000 + i % 500, cached_tokens=i % 700, completion_tokens=100 + i % 300,
        ttft_s=0.02 + (i % 97) / 500, e2e_s=0.5 + (i % 89) / 20, prefill_workers="p0",
        decode_workers="d0,d1", nodes="node-a,node-b", retries=i % 2, choices=1)
        for i in range(n)]


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall ns, thread CPU ns) of one call."""
    w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
    fn()
    return time.perf_counter_ns() - w0, time.thread_time_ns() - c0


def one_round(path: Path, recs: list[RequestRecord], prefill: int) -> dict[str, float]:
    store = RecordStore(path, RetentionPolicy(), clock=lambda: T0 + 3600)
    if prefill:
        for r in make_records(prefill, base=10_000_000):
            store.add(r)
        store.flush()

    def add_all() -> None:
        add = store.add
        for r in recs:
            add(r)

    n = len(recs)
    add_w, add_c = timed(add_all)
    flush_w, flush_c = timed(store.flush)
    assert store.stats()["raw_rows"] == n + prefill
    store.close()
    return {"add_us": add_w / n / 1000, "add_cpu_us": add_c / n / 1000,
            "flush_us": flush_w / n / 1000, "flush_cpu_us": flush_c / n / 1000,
            "file_bytes_per_row": sum(p.stat().st_size for p in path.parent.iterdir())
            / (n + prefill)}


def measure(target: str, n: int, prefill: int, rounds: int) -> dict[str, Any]:
    recs = make_records(n)
    runs = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as d:
            runs.append(one_round(Path(d) / "records.db", recs, prefill))
    return {"target": target, "n": n, "prefill_rows": prefill,
            **{k: statistics.median(r[k] for r in runs) for k in runs[0]}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--prefill", type=int, default=100_000)
    a = ap.parse_args()
    rows = [measure("fresh file", a.n, 0, a.rounds),
            measure(f"file with {a.prefill} rows", a.n, a.prefill, a.rounds)]
    hdr = (f"{'target':>24}{'records':>9}{'add µs':>9}{'add cpu':>9}{'flush µs':>10}"
           f"{'flush cpu':>11}{'bytes/row':>11}")
    print("µs per record (median of rounds)")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['target']:>24}{r['n']:>9}{r['add_us']:>9.2f}{r['add_cpu_us']:>9.2f}"
              f"{r['flush_us']:>10.2f}{r['flush_cpu_us']:>11.2f}{r['file_bytes_per_row']:>11.0f}")
    out = ROOT / "benchmarks" / "results" / "records.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rounds": a.rounds, "n": a.n, "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
