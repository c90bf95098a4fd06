"""Gateway throughput/latency/CPU benchmark: meshd vs sglang-router vs LiteLLM vs direct.

    scripts/bench_env.sh                       # once: competitors into .venv-bench
    .venv/bin/python benchmarks/gateway.py [--duration 3] [--rounds 2] [--only NAME,...]

One fake OpenAI worker (benchmarks/fake_backend.py, own process) serves everything. Targets:
the worker direct, meshd with 1 and 2 replicas (SO_REUSEPORT, one port), the mesh path with 2
replicas (`meshd-mesh-2`) and the same with a tenant policy checking every limit
(`meshd-mesh-gov-2`, `GOVERNANCE` below; `--skip gov` leaves it out), with privacy routing on
(`meshd-mesh-privacy-2`, `PRIVACY`; `--skip privacy`), with a signed receipt on every response
(`meshd-mesh-receipts-2`, `RECEIPTS`; `--skip receipts`), with every choice scored for
confidence (`meshd-mesh-confidence-2` from top-5 logprobs, as over vLLM;
`meshd-mesh-confidence-scored-2` from a second fake worker that scores its own tokens, as
meshd's engine and vLLM with meshd's scorer (node_agent/vllm_scorer.py) do; `CONFIDENCE`;
`--skip confidence`), sglang-router (Rust), the LiteLLM proxy. Load: `wrk` (C, one thread,
keep-alive, a Lua script for the POST) for non-streaming and streaming chat at concurrency 1
and 64, each cell `--duration` seconds,
rounds interleaved (round 1 runs every target once before round 2 starts). Reported per cell
(median over rounds): requests/s, p50/p99 latency, CPU time per request of the proxy
processes (utime+stime deltas from /proc/PID/stat, whole process tree), peak RSS per process
(VmHWM). Note: wrk, the worker and the proxy share this machine's cores; numbers compare
proxies within one run, they are not absolute capacity. Writes benchmarks/results/gateway.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_PY = ROOT / ".venv-bench" / "bin" / "python"
TICK = os.sysconf("SC_CLK_TCK")
KEY = "sk-meshd-bench-6f1d2c3b4a5e6f708192a3b4c5d6e7f8"  # LiteLLM refuses to start without one
BODY = {"model": "fake", "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16}


# Privacy routing on, every detector (the prompt is clean: it is routed as usual)
PRIVACY = """[gateway.privacy]
enabled = true
"""

# Every response signed (the default tenant's policy: these requests carry no API key)
RECEIPTS = """[gateway.governance.defaults]
receipts = true
"""

# Every choice's tokens scored for confidence (the workers asked for top-5 alternatives per
# token; never halted: the threshold is 0)
CONFIDENCE = """[gateway.confidence]
enabled = true
"""

# Every limit a tenant can have, set high enough never to refuse: what admission costs when
# it checks them all (mesh path; each replica keeps its own in-process ledger here).
GOVERNANCE = """[gateway.governance.tenants.bench]
rpm = 100000000
tpm = 1000000000
input_tpm = 1000000000
output_tpm = 1000000000
max_concurrent = 100000
max_tokens = 4096
daily_tokens = 100000000000
monthly_tokens = 1000000000000
daily_budget_usd = 1000000.0
monthly_budget_usd = 10000000.0
[gateway.governance.prices.fake]
input = 0.5
cached_input = 0.05
output = 1.5
[gateway.governance.fleet]
tokens_per_s = 100000000
spend_per_hour_usd = 1000000.0
[gateway.governance.fair]
max_active = 4096
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        todo.extend(int(k) for k in kids)
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for root in pids:
        for p in tree(root):
            try:
                f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(f[11]) + int(f[12])  # utime, stime (fields 14, 15)
            except OSError:
                pass
    return total / TICK


def peak_rss_mb(pids: list[int]) -> float:
    """Largest VmHWM of any single process in the trees (per-replica peak)."""
    best = 0
    for root in pids:
        for p in tree(root):
            try:
                m = re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{p}/status").read_text())
            except OSError:
                continue
            if m:
                best = max(best, int(m.group(1)))
    return best / 1024


@dataclass
class Target:
    name: str
    port: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    error: str | None = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def wait_ready(port: int, path: str, timeout: float, body: bytes | None = None) -> None:
    end = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < end:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                         headers={"content-type": "application/json",
                                                  "authorization": f"Bearer {KEY}"})
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return
        except Exception as e:
            last = e
        time.sleep(0.2)
    raise RuntimeError(f"port {port} not ready after {timeout}s: {last}")


def replica_costs(t: Target, key: str) -> tuple[list[dict[str, Any]], int]:
    """What each replica of `t` reports at `key` of GET /debug/governance (`cost_us`, or
    `privacy.cost_us`), for the replicas that timed any request, and how many answered. The
    replicas share one port, so ask until each has answered."""
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(50):
        req = urllib.request.Request(f"http://127.0.0.1:{t.port}/debug/governance",
                                     headers={"authorization": f"Bearer {KEY}",
                                              "connection": "close"})
        with urllib.request.urlopen(req, timeout=5) as r:
            d = json.loads(r.read())
        value = d
        for part in key.split("."):
            value = value[part]
        seen[d["ledger"]["replica"]] = value
        if len(seen) == len(t.procs):
            break
    return [c for c in seen.values() if c["samples"]], len(seen)


def weighted_cost(t: Target, key: str, fields: dict[str, str]) -> dict[str, Any] | None:
    """A stage's cost per request as `t`'s replicas time it in place (GET /debug/governance
    at `key`: `cost_us`, `privacy.cost_us`, ...), each of `fields` (the replica's name ->
    ours) weighted over the replicas by their samples."""
    timed, replicas = replica_costs(t, key)
    if not timed:
        return None
    n = sum(c["samples"] for c in timed)
    out: dict[str, Any] = {ours: sum(c[theirs] * c["samples"] for c in timed) / n
                           for theirs, ours in fields.items()}
    return {**out, "samples": n, "sampled_every": timed[0]["every"], "replicas": replicas}


def admission_cost(t: Target) -> dict[str, Any] | None:
    """Admission's cost (admit + settle) per request, over all of the target's requests."""
    c = weighted_cost(t, "cost_us", {"admit": "admit_us", "settle": "settle_us"})
    return None if c is None else {**c, "total_us": c["admit_us"] + c["settle_us"]}


def confidence_cost(t: Target) -> dict[str, Any] | None:
    """Scoring's cost per choice: each replica's mean per worker delta times its deltas per
    choice (weighted over the replicas by their samples)."""
    return weighted_cost(t, "confidence.cost_us", {"observe": "observe_us", "choice": "choice_us",
                                                   "deltas_per_choice": "deltas_per_choice"})


def spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    f = log.open("wb")
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)


# what `--only NAME` keeps out of the skip set
_SKIP_KEYS = {"meshd-1": ("plain",), "meshd-2": ("plain",), "meshd-mesh-2": ("mesh", "mesh2"),
              "meshd-mesh-gov-2": ("mesh", "gov"), "meshd-mesh-privacy-2": ("mesh", "privacy"),
              "meshd-mesh-receipts-2": ("mesh", "receipts"),
              "meshd-mesh-confidence-2": ("mesh", "confidence"),
              "meshd-mesh-confidence-scored-2": ("mesh", "confidence"),
              "sglang-router": ("sglang",),
              "litellm": ("litellm",)}


def start_targets(backend: int, logs: Path, skip: set[str], only: set[str],
                  scoring: int = 0) -> list[Target]:
    """The targets to measure: all but `skip`'s, or only `only`'s (and always direct)."""
    chat = json.dumps(BODY).encode()
    targets = [Target("direct", backend)]
    if only:
        skip = skip | {"sglang", "litellm", "mesh", "gov", "privacy", "receipts", "plain", "mesh2",
                       "confidence"}
        skip -= {k for name in only for k in _SKIP_KEYS.get(name, ())}
    for n in (1, 2) if "plain" not in skip else ():
        t = Target(f"meshd-{n}", free_port())
        for i in range(n):
            t.procs.append(spawn([sys.executable, "-m", "meshd.coordinator.gateway", "--port",
                                  str(t.port), "--backend", f"http://127.0.0.1:{backend}"],
                                 logs / f"meshd{n}-{i}.log"))
        targets.append(t)
    # the full mesh path (tokenize + hash + route + lifecycle + reshape), plain and with
    # each governance and trust stage on: (name, skip key, config, extra args)
    # (`scoring`: a second fake worker that scores its own tokens, as meshd's engine does)
    meshes = [("meshd-mesh-2", "mesh2", "", [], backend),
              ("meshd-mesh-gov-2", "gov", GOVERNANCE, ["--api-key", f"bench={KEY}"], backend),
              ("meshd-mesh-privacy-2", "privacy", PRIVACY, [], backend),
              ("meshd-mesh-receipts-2", "receipts", RECEIPTS, [], backend),
              ("meshd-mesh-confidence-2", "confidence", CONFIDENCE, [], backend),
              ("meshd-mesh-confidence-scored-2", "confidence", CONFIDENCE, [], scoring)]
    for name, key, conf, extra, worker in meshes if "mesh" not in skip else ():
        if key in skip or not worker:
            continue
        t = Target(name, free_port())
        args = list(extra)
        if conf:
            path = logs / f"{key}.toml"
            path.write_text(conf)
            args += ["--config", str(path)]
        for i in range(2):
            t.procs.append(spawn([sys.executable, "-m", "meshd.coordinator.gateway", "--mesh",
                                  "--port", str(t.port), "--backend",
                                  f"http://127.0.0.1:{worker}", *args],
                                 logs / f"{name}-{i}.log"))
        targets.append(t)
    if "sglang" not in skip:
        t = Target("sglang-router", free_port())
        if not BENCH_PY.exists():
            t.error = "no .venv-bench (run scripts/bench_env.sh)"
        else:
            t.procs.append(spawn([str(BENCH_PY), "-m", "sglang_router.launch_router",
                                  "--worker-urls", f"http://127.0.0.1:{backend}", "--host",
                                  "127.0.0.1", "--port", str(t.port), "--policy", "round_robin",
                                  "--log-level", "error", "--disable-retries",
                                  "--disable-circuit-breaker"], logs / "sglang.log"))
        targets.append(t)
    if "litellm" not in skip:
        t = Target("litellm", free_port())
        cfg = logs / "litellm.yaml"
        cfg.write_text(
            "model_list:\n  - model_name: fake\n    litellm_params:\n      model: openai/fake\n"
            f"      api_base: http://127.0.0.1:{backend}/v1\n      api_key: sk-bench\n"
            "litellm_settings:\n  telemetry: false\n"
            f"general_settings:\n  master_key: {KEY}\n")
        exe = BENCH_PY.parent / "litellm"
        if not exe.exists():
            t.error = "litellm not installed in .venv-bench"
        else:
            t.procs.append(spawn([str(exe), "--config", str(cfg), "--host", "127.0.0.1",
                                  "--port", str(t.port), "--num_workers", "1"],
                                 logs / "litellm.log"))
        targets.append(t)
    for t in targets:
        if t.error is None:
            try:
                wait_ready(t.port, "/v1/chat/completions",
                           90 if t.name == "litellm" else 30, chat)
            except RuntimeError as e:
                t.error = f"did not start: {e}"
                t.stop()
    return targets


LUA = """wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
"""


def run_wrk(port: int, conc: int, duration: float, script: Path) -> dict[str, Any]:
    proc = subprocess.run(
        ["wrk", "-t1", f"-c{conc}", f"-d{max(1, round(duration))}s", "--latency",
         "--timeout", "10s", "-s", str(script), f"http://127.0.0.1:{port}/v1/chat/completions"],
        capture_output=True, text=True, timeout=duration + 30)
    out = proc.stdout
    if "requests in" not in out:
        raise RuntimeError(f"wrk failed on port {port}: {out[-500:]} {proc.stderr[-500:]}")

    def lat(pct: str) -> float:
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: (.*)", out)
    return {"requests": total, "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out)
                                            .group(1)),  # type: ignore[union-attr]
            "p50_ms": lat("50"), "p99_ms": lat("99"), "non_2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": errs.group(1) if errs else ""}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma list: sglang,litellm")
    ap.add_argument("--only", default="", help="comma list of target names to run (and direct)")
    a = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("needs wrk (apt-get install -y wrk)")
    logs = Path(tempfile.mkdtemp(prefix="meshd-gwbench-"))
    scripts = {}
    for mode, extra in (("json", {}), ("stream", {"stream": True})):
        p = logs / f"{mode}.lua"
        p.write_text(LUA.replace("{body}", json.dumps({**BODY, **extra})).replace("{key}", KEY))
        scripts[mode] = p
    bport = free_port()
    backend = spawn([sys.executable, str(ROOT / "benchmarks" / "fake_backend.py"), "--port",
                     str(bport), "--chunks", "8"], logs / "backend.log")
    sport = free_port()  # the worker that scores its own tokens (meshd-mesh-confidence-scored)
    scorer = spawn([sys.executable, str(ROOT / "benchmarks" / "fake_backend.py"), "--port",
                    str(sport), "--chunks", "8", "--scores"], logs / "scorer.log")
    wait_ready(sport, "/health", 15)
    wait_ready(bport, "/health", 15)
    targets = start_targets(bport, logs, set(filter(None, a.skip.split(","))),
                            set(filter(None, a.only.split(","))), sport)
    live = [t for t in targets if t.error is None]
    cells: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    costs: dict[str, dict[str, Any] | None] = {}
    try:
        for t in live:  # warm-up
            run_wrk(t.port, 8, 1, scripts["json"])
        for _ in range(a.rounds):
            for t in live:
                pids = t.pids or [backend.pid]
                for mode in ("json", "stream"):
                    for conc in (1, 64):
                        c0 = cpu_seconds(pids)
                        r = run_wrk(t.port, conc, a.duration, scripts[mode])
                        r["cpu_us_per_req"] = ((cpu_seconds(pids) - c0) / max(r["requests"], 1)
                                               * 1e6)
                        cells.setdefault((t.name, mode, conc), []).append(r)
        rss = {t.name: peak_rss_mb(t.pids or [backend.pid]) for t in live}
        costs.update({t.name: admission_cost(t) for t in live if t.name == "meshd-mesh-gov-2"})
        costs.update({t.name: weighted_cost(t, "privacy.cost_us", {"check": "check_us"})
                      for t in live if t.name == "meshd-mesh-privacy-2"})
        costs.update({t.name: weighted_cost(t, "receipts.cost_us", {"build": "build_us"})
                      for t in live if t.name == "meshd-mesh-receipts-2"})
        costs.update({t.name: confidence_cost(t) for t in live
                      if t.name.startswith("meshd-mesh-confidence")})
    finally:
        for t in targets:
            t.stop()
        for worker in (backend, scorer):
            worker.terminate()
            worker.wait(10)
    report(targets, cells, rss, costs, a, logs)


def report(targets: list[Target], cells: dict[tuple[str, str, int], list[dict[str, Any]]],
           rss: dict[str, float], costs: dict[str, dict[str, Any] | None],
           a: argparse.Namespace, logs: Path) -> None:
    rows = []
    direct_p50 = {(m, c): statistics.median(x["p50_ms"] for x in v)
                  for (n, m, c), v in cells.items() if n == "direct"}
    for (name, mode, conc), runs in cells.items():
        med = {k: statistics.median(r[k] for r in runs)
               for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req")}
        rows.append({"target": name, "mode": mode, "concurrency": conc, **med,
                     "added_p50_ms": med["p50_ms"] - direct_p50.get((mode, conc), 0.0),
                     "non_2xx": sum(r["non_2xx"] for r in runs),
                     "socket_errors": [r["socket_errors"] for r in runs if r["socket_errors"]],
                     "peak_rss_mb": rss.get(name), "rounds": runs})
    hdr = (f"{'target':<23}{'mode':<7}{'conc':>5}{'req/s':>10}{'p50 ms':>9}{'+p50 ms':>9}"
           f"{'p99 ms':>9}{'cpu us/req':>11}{'rss MB':>8}{'non2xx':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['target']:<23}{r['mode']:<7}{r['concurrency']:>5}{r['rps']:>10.0f}"
              f"{r['p50_ms']:>9.3f}{r['added_p50_ms']:>9.3f}{r['p99_ms']:>9.2f}"
              f"{r['cpu_us_per_req']:>11.0f}{(r['peak_rss_mb'] or 0):>8.0f}{r['non_2xx']:>8}")
    failed = {t.name: t.error for t in targets if t.error}
    for name, err in failed.items():
        print(f"{name:<23}NOT RUN: {err}")
    for name, c in costs.items():
        if c is not None and "admit_us" in c:
            print(f"\n{name}: admission timed in place by its replicas: admit {c['admit_us']:.1f}"
                  f" + settle {c['settle_us']:.1f} = {c['total_us']:.1f} us of CPU per request "
                  f"(thread CPU clock, {c['samples']} sampled requests, one in "
                  f"{c['sampled_every']}, on {c['replicas']} replicas)")
        elif c is not None and "choice_us" in c:
            print(f"\n{name}: confidence scoring timed in place by its replicas: "
                  f"{c['choice_us']:.1f} us of CPU per choice ({c['observe_us']:.2f} us per "
                  f"worker delta x {c['deltas_per_choice']:.1f} deltas; thread CPU clock, "
                  f"{c['samples']} sampled deltas, one in {c['sampled_every']}, on "
                  f"{c['replicas']} replicas)")
        elif c is not None and "build_us" in c:
            print(f"\n{name}: each response's receipt (digests, JSON, one Ed25519 signature) "
                  f"timed in place by its replicas: {c['build_us']:.1f} us of CPU per request "
                  f"(thread CPU clock, {c['samples']} sampled requests, one in "
                  f"{c['sampled_every']}, on {c['replicas']} replicas)")
        elif c is not None:
            print(f"\n{name}: the privacy stage timed in place by its replicas: "
                  f"{c['check_us']:.1f} us of CPU per request (thread CPU clock, "
                  f"{c['samples']} sampled requests, one in {c['sampled_every']}, on "
                  f"{c['replicas']} replicas)")
    out = ROOT / "benchmarks" / "results" / "gateway.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join(sys.argv), "duration_s": a.duration, "rounds": a.rounds,
        "load_generator": "wrk -t1 (same machine; shares the CPU cores with worker and proxy)",
        "cpus": os.cpu_count(), "note": "direct: cpu/rss are the fake worker's own",
        "rows": rows,
        "admission_cost_us": {k: v for k, v in costs.items() if "gov" in k},
        "privacy_cost_us": {k: v for k, v in costs.items() if "privacy" in k},
        "receipts_cost_us": {k: v for k, v in costs.items() if "receipts" in k},
        "confidence_cost_us": {k: v for k, v in costs.items() if "confidence" in k},
        "not_run": failed, "logs": str(logs)},
        indent=1))
    print(f"\nwrote {out} (process logs in {logs})")


if __name__ == "__main__":
    main()
