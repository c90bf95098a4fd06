"""Control-plane benchmark: N simulated agents heartbeating against one coordinator.

The coordinator's control server runs in its own process (the same `ControlServer` the Ray
actor runs, without Ray around it) so its RSS and CPU are its own. One load process holds N
signed identities, registers them, then:
  - saturation: every agent heartbeats back to back for `--seconds` (verified heartbeats/s,
    client-observed latency p50/p99, server-side handle time p99 from its histogram);
  - steady: every agent heartbeats at its interval (2 s) for `--seconds` (latency at the load a
    real fleet of N agents puts on the coordinator).
Then a real `meshd agent` process registers and its RSS at idle is read.

Usage: python benchmarks/control_plane.py [--agents 100 1000] [--seconds 5]
Prints a table and writes benchmarks/results/control_plane.json. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def serve(state_dir: str, port: int, metrics_port: int) -> None:
    """Child process: run the control server until killed."""
    from meshd.config import CoordinatorConfig
    from meshd.coordinator.grpc_server import ControlServer
    from meshd.coordinator.metrics import ControlMetrics
    from meshd.coordinator.store import Store

    cfg = CoordinatorConfig(grpc_port=port, metrics_port=metrics_port, state_dir=state_dir,
                            suspect_after_s=30, dead_after_s=60)

    async def main() -> None:
        server = ControlServer(cfg, Store(state_dir), ControlMetrics())
        await server.start()
        await asyncio.Event().wait()

    asyncio.run(main())


def server_p99(metrics_port: int) -> float:
    """p99 of meshd_control_handle_seconds{method=Heartbeat} from the histogram buckets."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    buckets = []
    for line in text.splitlines():
        if line.startswith("meshd_control_handle_seconds_bucket") and 'Heartbeat' in line:
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float(le), float(line.rsplit(" ", 1)[1])))
    total = buckets[-1][1] if buckets else 0
    for le, count in buckets:
        if total and count >= 0.99 * total:
            return le
    return float("nan")


async def load(address: str, idents: list[Any], seconds: float, interval_s: float
               ) -> dict[str, float]:
    from meshd import capabilities as caps
    from meshd.node_agent.client import ControlClient
    from meshd.proto.v1 import control_pb2 as pb

    # one channel shared by all simulated agents (the server sees distinct keys and nonces)
    base = ControlClient(address, idents[0], timeout_s=30)
    report = caps.to_pb(caps.Capabilities(host=caps.Host("sim", 8, 1 << 30)))
    for ident in idents:
        await ControlClient(address, ident, 30, base.channel).register(report)
    lat: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def agent(ident: Any) -> None:
        client = ControlClient(address, ident, 30, base.channel)
        seq = 0
        if interval_s:
            await asyncio.sleep(interval_s * (hash(ident.node_id) % 1000) / 1000)
        while time.perf_counter() < stop_at:
            seq += 1
            t0 = time.perf_counter()
            await client.heartbeat(pb.HeartbeatRequest(seq=seq, cpu_load=0.1))
            lat.append(time.perf_counter() - t0)
            if interval_s:
                await asyncio.sleep(max(0.0, interval_s - (time.perf_counter() - t0)))

    t0 = time.perf_counter()
    await asyncio.gather(*(agent(i) for i in idents))
    elapsed = time.perf_counter() - t0
    await base.close()
    lat.sort()
    n = len(lat)
    return {"heartbeats": n, "per_s": n / elapsed,
            "p50_ms": lat[n // 2] * 1e3 if n else float("nan"),
            "p99_ms": lat[min(n - 1, int(n * 0.99))] * 1e3 if n else float("nan")}


def agent_idle_rss(address: str, coord_state: str) -> float:
    """Start a real `meshd agent`, trust it, wait until it heartbeats, read its RSS."""
    from meshd.coordinator.store import Store
    from meshd.node_agent import identity

    with tempfile.TemporaryDirectory() as d:
        ident = identity.load_or_create(d)
        store = Store(coord_state)
        store.add_key(ident.public_key, ident.node_id)
        store.close()
        proc = subprocess.Popen([sys.executable, "-m", "meshd", "agent", "--state-dir", d,
                                 "--coordinator", address], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(8)  # import, register, a few heartbeats
            return rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(10)


def run_one(n: int, seconds: float) -> dict[str, Any]:
    from meshd.coordinator.store import Store
    from meshd.node_agent.identity import Identity

    state = tempfile.mkdtemp(prefix="meshd-bench-")
    port, mport = free_port(), free_port()
    idents = [Identity.generate() for _ in range(n)]
    store = Store(state)
    for i in idents:
        store.add_key(i.public_key, i.node_id)
    store.close()
    proc = mp.get_context("spawn").Process(target=serve, args=(state, port, mport), daemon=True)
    proc.start()
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
    try:
        sat = asyncio.run(load(address, idents, seconds, 0.0))
        p99_server = server_p99(mport)
        steady = asyncio.run(load(address, idents, seconds, 2.0))
        coord_rss = rss_mb(proc.pid or 0)
        agent_rss = agent_idle_rss(address, state) if n == 100 else float("nan")
    finally:
        proc.kill()
        proc.join(5)
    return {"agents": n, "saturation": sat, "server_handle_p99_ms_le": p99_server * 1e3,
            "steady_2s": steady, "coordinator_rss_mb": coord_rss, "agent_idle_rss_mb": agent_rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    rows = [run_one(n, args.seconds) for n in args.agents]
    print(f"\ncontrol plane, {os.cpu_count()} CPUs, load generator and coordinator on one host")
    print(f"{'agents':>6} {'verified hb/s':>13} {'p50 ms':>7} {'p99 ms':>7} {'srv p99 ≤ms':>11} "
          f"{'steady hb/s':>11} {'steady p99 ms':>13} {'coord RSS MB':>12} {'agent RSS MB':>12}")
    for r in rows:
        s, st = r["saturation"], r["steady_2s"]
        print(f"{r['agents']:>6} {s['per_s']:>13.0f} {s['p50_ms']:>7.2f} {s['p99_ms']:>7.2f} "
              f"{r['server_handle_p99_ms_le']:>11.2f} {st['per_s']:>11.0f} {st['p99_ms']:>13.2f} "
              f"{r['coordinator_rss_mb']:>12.1f} {r['agent_idle_rss_mb']:>12.1f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "control_plane.json"
    out.write_text(json.dumps({"rows": rows, "cpus": os.cpu_count(),
                               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
