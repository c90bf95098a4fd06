"""A flooding tenant cannot starve a light one: served-token shares and the light tenant's TTFT,
with and without fair share.

    .venv/bin/python benchmarks/fair_share.py [--duration 10] [--capacity 8] [--delay 0.01]
        [--flood-clients 32] [--flood-chunks 32] [--light-chunks 4]
        [--light-weight 1] [--light-priority normal]

One gateway (`GatewayRuntime`, in this process, uvloop) in front of one fake worker
(benchmarks/fake_backend.py) that streams at most `--capacity` requests at once, one chunk (3
tokens) every `--delay` seconds each, and queues the rest FIFO: a saturated worker. Two tenants
by API key: `flood` runs `--flood-clients` clients, each sending streamed requests one after the
other, of `--flood-chunks` chunks on average (uniform in 0.5x..1.5x, seeded, so that running
requests end at different times); `light` runs one client sending `--light-chunks`-chunk
requests one after the other. Every request's `max_tokens` is what it produces; prompts differ
(the loop breaker is off: it would only log). Two runs of
`--duration` seconds, each on a fresh gateway and worker:
- off: `fair.max_active = 0`, every request goes straight to the worker's FIFO queue;
- on: `fair.max_active = --capacity`, past that many running requests new ones queue per tenant
  at the gateway and are served by least attained service (VTC; `--light-weight` and
  `--light-priority` set the light tenant's policy).
Reported per run and tenant: requests completed within the window, completion tokens they were
served (their `usage`) and the tenant's share of the total, and client-side TTFT (request sent
-> first content chunk) p50/p95/max; plus the worker's and the fair queue's peak depth. Requests
still running at the end are cancelled and not counted. Loopback only; prints a table, writes
benchmarks/results/fair_share.json. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from fake_backend import FakeBackend  # noqa: E402

from meshd.config import build  # noqa: E402
from meshd.coordinator.gateway.config import GatewayConfig  # noqa: E402
from meshd.coordinator.gateway.runtime import GatewayRuntime  # noqa: E402

KEYS = {"flood": "sk-flood-0123456789", "light": "sk-light-0123456789"}
MAX_REQUESTS = 100_000  # per client: a bound on every loop


@dataclass
class Tally:
    """What one tenant's clients saw in one run."""

    requests: int = 0
    tokens: int = 0
    errors: int = 0
    ttft: list[float] = field(default_factory=list)


def make_config(backend: int, max_active: int, light: dict[str, Any]) -> GatewayConfig:
    tenants = {"flood": {"api_keys": [KEYS["flood"]]},
               "light": {"api_keys": [KEYS["light"]], **light}}
    # No membership refresh during a run: a runtime stopped while its refresh connects can
    # hang on Python 3.11 (asyncio.wait_for there may swallow the cancellation).
    return build(GatewayConfig, {
        "port": 0, "static_workers": [f"http://127.0.0.1:{backend}"],
        "membership_interval_s": 3600.0,
        "governance": {"tenants": tenants, "fair": {"max_active": max_active},
                       "loops": {"enabled": False}}}, "gateway.")


async def one_request(http: aiohttp.ClientSession, url: str, tenant: str, prompt: str,
                      chunks: int, delay: float, tally: Tally) -> None:
    """One streamed completion; counted only once it has finished."""
    body = {"model": "fake", "prompt": prompt, "max_tokens": 3 * chunks,
            "stream": True, "stream_options": {"include_usage": True},
            "fake_chunks": chunks, "fake_delay": delay}
    t0 = time.perf_counter()
    first = 0.0
    tokens = 0
    async with http.post(url, json=body,
                         headers={"authorization": f"Bearer {KEYS[tenant]}"}) as r:
        if r.status != 200:
            await r.read()
            tally.errors += 1
            return
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            event = orjson.loads(line[6:])
            if not first and any(c.get("text") for c in event.get("choices", ())):
                first = time.perf_counter() - t0
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
    tally.requests += 1
    tally.tokens += tokens
    tally.ttft.append(first)


async def client(http: aiohttp.ClientSession, url: str, tenant: str, i: int, chunks: int,
                 spread: bool, delay: float, until: float, tally: Tally) -> None:
    """Client `i` of `tenant`: requests one after the other until `until`."""
    rng = random.Random(f"{tenant}/{i}")
    for n in range(MAX_REQUESTS):
        if time.perf_counter() >= until:
            return
        k = rng.randint(max(1, chunks // 2), chunks * 3 // 2) if spread else chunks
        await one_request(http, url, tenant, f"{tenant} client {i} asks {n}", k, delay, tally)


async def sample_depth(rt: GatewayRuntime, peak: list[int]) -> None:
    for _ in range(1_000_000):  # cancelled at the end of the run
        peak[0] = max(peak[0], rt.governor.fair.depth())
        await asyncio.sleep(0.02)


async def run(a: argparse.Namespace, fair: bool) -> dict[str, Any]:
    be = FakeBackend(chunks=a.flood_chunks, capacity=a.capacity)
    backend = await be.start()
    light = {"weight": a.light_weight, "priority": a.light_priority} if fair else {}
    rt = GatewayRuntime(make_config(backend, a.capacity if fair else 0, light))
    await rt.start()
    url = f"http://127.0.0.1:{rt.server.port}/v1/completions"
    tallies = {"flood": Tally(), "light": Tally()}
    peak = [0]
    conn = aiohttp.TCPConnector(limit=a.flood_clients + 8)
    try:
        async with aiohttp.ClientSession(connector=conn) as http:
            until = time.perf_counter() + a.duration
            tasks = [asyncio.create_task(client(http, url, "flood", i, a.flood_chunks, True,
                                                a.delay, until, tallies["flood"]))
                     for i in range(a.flood_clients)]
            await asyncio.sleep(0.2)  # the flood is queued at the worker before light comes
            tasks.append(asyncio.create_task(client(http, url, "light", 0, a.light_chunks,
                                                    False, a.delay, until, tallies["light"])))
            sampler = asyncio.create_task(sample_depth(rt, peak))
            await asyncio.sleep(max(0.0, until - time.perf_counter()))
            for t in [*tasks, sampler]:
                t.cancel()
            await asyncio.gather(*tasks, sampler, return_exceptions=True)
    finally:
        await rt.stop(2)
        if be.server is not None:
            be.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(be.server.wait_closed(), 2)
    total = sum(t.tokens for t in tallies.values()) or 1
    out: dict[str, Any] = {"fair_share": fair, "worker_queue_peak": be.stats["queued_peak"],
                           "fair_queue_peak": peak[0], "tenants": {}}
    for name, tally in tallies.items():
        out["tenants"][name] = {"requests": tally.requests, "completion_tokens": tally.tokens,
                                "token_share": tally.tokens / total, "errors": tally.errors,
                                **percentiles(tally.ttft)}
    return out


def percentiles(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"ttft_p50_s": None, "ttft_p95_s": None, "ttft_max_s": None}
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]
    return {"ttft_p50_s": statistics.median(xs), "ttft_p95_s": p95, "ttft_max_s": xs[-1]}


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


async def measure(a: argparse.Namespace) -> list[dict[str, Any]]:
    return [await run(a, fair=False), await run(a, fair=True)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--capacity", type=int, default=8, help="the worker's concurrent streams")
    ap.add_argument("--delay", type=float, default=0.01, help="seconds between a stream's chunks")
    ap.add_argument("--flood-clients", type=int, default=32)
    ap.add_argument("--flood-chunks", type=int, default=32)
    ap.add_argument("--light-chunks", type=int, default=4)
    ap.add_argument("--light-weight", type=float, default=1.0)
    ap.add_argument("--light-priority", default="normal", choices=("high", "normal", "low"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fair_share.json"))
    a = ap.parse_args()
    t0 = time.perf_counter()
    runs = uvloop.run(measure(a))
    print(f"{'fair share':10} {'tenant':6} {'requests':>8} {'tokens':>7} {'share':>6} "
          f"{'TTFT p50 s':>10} {'p95 s':>7} {'max s':>7} {'errors':>6}")
    print("-" * 75)
    for r in runs:
        for name, t in r["tenants"].items():
            print(f"{'on' if r['fair_share'] else 'off':10} {name:6} {t['requests']:8d} "
                  f"{t['completion_tokens']:7d} {t['token_share']:6.1%} "
                  f"{fmt(t['ttft_p50_s']):>10} {fmt(t['ttft_p95_s']):>7} "
                  f"{fmt(t['ttft_max_s']):>7} {t['errors']:6d}")
    for r in runs:
        print(f"fair share {'on' if r['fair_share'] else 'off'}: worker queue peak "
              f"{r['worker_queue_peak']}, fair queue peak {r['fair_queue_peak']}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"duration_s": a.duration, "capacity": a.capacity,
                               "delay_s": a.delay, "flood_clients": a.flood_clients,
                               "flood_chunks": a.flood_chunks, "light_chunks": a.light_chunks,
                               "light_weight": a.light_weight,
                               "light_priority": a.light_priority, "runs": runs}, indent=1))
    print(f"\nwrote {out} ({time.perf_counter() - t0:.1f}s)")


if __name__ == "__main__":
    main()
