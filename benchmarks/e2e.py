"""End-to-end benchmark of the embedded mesh: disaggregated vs colocated, with and without a
shared prompt prefix.

Two layouts on the same two engine processes' worth of CPU:
  disaggregated: one prefill worker + one decode worker; every request is prefilled on the
                 prefill worker and its KV pulled by the decode worker (P/D threshold 0);
  colocated:     two "both" workers; each request prefilled and decoded on one of them, picked
                 by meshd's router (prefix + load).
Workloads: unique prompts, and prompts sharing a long prefix. For each: streaming requests
through the real gateway at concurrency 1 and 4; TTFT p50/p99, end-to-end latency p50,
requests/s and output tokens/s. Everything runs on this machine's cores (2 here), so the
layouts compete for the same CPU: read the table as relative, not as GPU figures.

Usage: python benchmarks/e2e.py [--requests 16] [--max-tokens 32] [--prompt-tokens 480]
Prints a table, writes benchmarks/results/e2e.json. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def engines(roles: list[str], tmp: Path) -> Iterator[list[Any]]:
    from meshd.capabilities import Worker

    secret = tmp / "kv_secret"
    secret.write_text("meshd-bench-secret-0123456789abcdef\n")
    secret.chmod(0o600)
    procs, workers = [], []
    try:
        for i, role in enumerate(roles):
            port, kv, ev, rp = (free_port() for _ in range(4))
            wid = f"{role[0]}{i}"
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "meshd", "engine", "serve", "--port", str(port),
                 "--role", role, "--num-blocks", "1024", "--kv-port", str(kv),
                 "--kv-events-port", str(ev), "--kv-replay-port", str(rp),
                 "--kv-secret-file", str(secret), "--engine-id", wid],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
            workers.append(Worker(wid, f"http://127.0.0.1:{port}", role, "meshd-tiny",
                                  kv_block_size=16, kv_capacity_blocks=1024,
                                  kv_events_endpoint=f"tcp://127.0.0.1:{ev}",
                                  kv_events_replay_endpoint=f"tcp://127.0.0.1:{rp}"))
        deadline = time.monotonic() + 120
        for w in workers:
            while True:
                try:
                    urllib.request.urlopen(w.endpoint + "/health", timeout=2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{w.worker_id} not ready") from None
                    time.sleep(0.2)
        yield workers
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def prompts(n: int, tokens: int, shared: bool, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["mesh", "prefill", "decode", "cache", "block", "token", "route", "worker"]

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k // 6 + 1))[:k]

    prefix = text(tokens - 64) if shared else ""
    return [(prefix + text(64)) if shared else text(tokens) for _ in range(n)]


async def run_load(url: str, items: list[str], concurrency: int, max_tokens: int
                   ) -> dict[str, float]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
    ttft: list[float] = []
    e2e: list[float] = []
    out_tokens = 0
    queue = list(items)

    async def worker() -> None:
        nonlocal out_tokens
        while queue:
            prompt = queue.pop()
            t0 = time.perf_counter()
            first = 0.0
            stream = await client.completions.create(
                model="meshd-tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text and not first:
                    first = time.perf_counter()
                if chunk.usage:
                    out_tokens += chunk.usage.completion_tokens
            done = time.perf_counter()
            ttft.append((first or done) - t0)
            e2e.append(done - t0)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    wall = time.perf_counter() - t0
    ttft.sort()
    e2e.sort()
    n = len(ttft)
    return {"requests": n, "ttft_p50_ms": ttft[n // 2] * 1e3,
            "ttft_p99_ms": ttft[min(n - 1, int(n * 0.99))] * 1e3,
            "e2e_p50_ms": e2e[n // 2] * 1e3, "req_per_s": n / wall,
            "out_tok_per_s": out_tokens / wall}


async def measure(layout: str, workers: list[Any], runs: list[tuple[str, list[str], int]],
                  max_tokens: int) -> list[dict[str, Any]]:
    from meshd.capabilities import Member
    from meshd.coordinator.gateway.config import GatewayConfig, RoutingConfig
    from meshd.coordinator.gateway.runtime import GatewayRuntime
    from meshd.scheduler.pd import PDConfig

    pd = PDConfig(min_uncached_tokens=0 if layout == "disaggregated" else 1 << 30)
    settings = GatewayConfig(port=free_port(), replicas=1, routing=RoutingConfig(pd=pd))

    async def members() -> list[Any]:
        return [Member("bench", w) for w in workers]

    rt = GatewayRuntime(settings, members)
    await rt.start()
    rows = []
    try:
        url = f"http://127.0.0.1:{settings.port}"
        await run_load(url, prompts(2, 64, False, 99), 1, 4)  # warm-up
        for workload, items, conc in runs:
            r = await run_load(url, items, conc, max_tokens)
            rows.append({"layout": layout, "workload": workload, "concurrency": conc, **r,
                         "disaggregated": rt.handler.counters.disaggregated})
    finally:
        await rt.stop(5)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=480)
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    layouts: dict[str, list[str]] = {"disaggregated": ["prefill", "decode"],
                                     "colocated": ["both", "both"]}
    for layout, roles in layouts.items():
        with tempfile.TemporaryDirectory() as d, engines(roles, Path(d)) as workers:
            runs = []
            for conc in (1, 4):
                for shared in (False, True):
                    seed = 1000 * conc + shared  # same prompts for both layouts
                    runs.append(("shared-prefix" if shared else "unique",
                                 prompts(args.requests, args.prompt_tokens, shared, seed), conc))
            rows += asyncio.run(measure(layout, workers, runs, args.max_tokens))
    print(f"\nembedded mesh, {os.cpu_count()} CPUs, {args.requests} requests per cell, prompts "
          f"~{args.prompt_tokens} chars, {args.max_tokens} output tokens")
    print(f"{'layout':<14} {'workload':<14} {'conc':>4} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'e2e p50':>8} {'req/s':>6} {'out tok/s':>9}")
    for r in rows:
        print(f"{r['layout']:<14} {r['workload']:<14} {r['concurrency']:>4} "
              f"{r['ttft_p50_ms']:>7.0f}ms {r['ttft_p99_ms']:>7.0f}ms {r['e2e_p50_ms']:>6.0f}ms "
              f"{r['req_per_s']:>6.2f} {r['out_tok_per_s']:>9.1f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "e2e.json"
    out.write_text(json.dumps({"rows": rows, "args": vars(args), "cpus": os.cpu_count(),
                               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
