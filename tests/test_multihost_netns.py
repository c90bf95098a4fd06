"""Issue 13 §1: meshd on two hosts, each a network namespace of its own joined by a veth link.

Host A (`10.211.N.1`) runs `meshd up` with one prefill worker: the coordinator (a Ray head,
the registry, the gateway) and its local agent. Host B (`10.211.N.2`) runs `meshd agent` with
one decode worker, joining A's control plane over the link with a key the operator trusted
(`meshd trust add --host`). A request through the gateway is prefilled on A and decoded on B:
B's worker pulls A's KV blocks across the veth link (its pull counters move), and `meshd
status` on A sees both nodes alive. The namespaces have no route to anything else: what
works here crosses a real network interface, addressed as two hosts would be.

Needs root and iproute2 (`ip netns`); every process is killed and both namespaces removed at
the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="needs root and iproute2 (network namespaces)"),
    pytest.mark.timeout(400),
]

SUBNET = 200 + os.getpid() % 50
HOST_A, HOST_B = f"10.211.{SUBNET}.1", f"10.211.{SUBNET}.2"
GATEWAY_PORT, GRPC_PORT, B_BASE_PORT = 8000, 50151, 8200  # fresh namespaces: all free
PROMPT = "Two hosts share this prompt: one prefills it, the other decodes the answer. " * 4


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[str, str]]:
    """Namespaces A and B, a veth pair between them, loopback up in each."""
    a, b = f"meshd-a{os.getpid()}", f"meshd-b{os.getpid()}"
    va, vb = f"mva{os.getpid() % 10000}", f"mvb{os.getpid() % 10000}"
    ip("netns", "add", a)
    try:
        ip("netns", "add", b)
        try:
            ip("link", "add", va, "type", "veth", "peer", "name", vb)
            ip("link", "set", va, "netns", a)
            ip("link", "set", vb, "netns", b)
            for ns, dev, addr in ((a, va, HOST_A), (b, vb, HOST_B)):
                ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                ip("-n", ns, "link", "set", dev, "up")
                ip("-n", ns, "link", "set", "lo", "up")
            yield a, b
        finally:
            subprocess.run(["ip", "netns", "del", b], capture_output=True, timeout=30)
    finally:
        subprocess.run(["ip", "netns", "del", a], capture_output=True, timeout=30)


def in_ns(ns: str, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], env={**os.environ, **env},
                            stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def ns_python(ns: str, code: str, timeout: float = 60) -> Any:
    """Run `code` in namespace `ns`; it prints one JSON value."""
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def http_get(ns: str, url: str) -> Any:
    return ns_python(ns, f"""
import json, urllib.request
try:
    with urllib.request.urlopen({url!r}, timeout=10) as r:
        body = r.read().decode()
    print(json.dumps({{"ok": True, "body": body}}))
except Exception as e:
    print(json.dumps({{"ok": False, "error": str(e)}}))
""")


def metric(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(
        rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def wait(what: str, cond: Any, timeout_s: float, logs: list[Path]) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(1.0)
    tails = "\n".join(f"--- {p.name}:\n{p.read_text(errors='replace')[-3000:]}"
                      for p in logs if p.exists())
    raise AssertionError(f"{what}: not within {timeout_s:.0f}s\n{tails}")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def test_prefill_on_one_host_decode_on_another(tmp_path: Path) -> None:
    ray_tmp = Path(tempfile.mkdtemp(prefix="mns"))  # short: Ray's socket paths
    coord, agent_a, agent_b = tmp_path / "coord", tmp_path / "a", tmp_path / "b"
    secret = tmp_path / "kv_secret"  # one KV transfer secret for the mesh, on both hosts
    secret.write_text("meshd-two-host-secret-0123456789abcdef\n")
    secret.chmod(0o600)
    common = {"MESHD_WORKERS_KV_SECRET_FILE": str(secret), "MESHD_WORKERS_KV_TRANSFER": "tcp",
              "MESHD_RAY_INCLUDE_DASHBOARD": "0", "MESHD_RAY_NUM_CPUS": "1",
              "RAY_TMPDIR": str(ray_tmp), "MESHD_RAY_NAMESPACE": "meshd-netns"}
    # Host B's key, trusted by the operator on A for B's address.
    shown = subprocess.run([sys.executable, "-m", "meshd", "identity", "show", "--state-dir",
                            str(agent_b)], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    public = re.search(r"public key: ([0-9a-f]{64})", shown.stdout)
    assert public is not None
    trusted = subprocess.run([sys.executable, "-m", "meshd", "trust", "--state-dir", str(coord),
                              "add", public.group(1), "--label", "host-b", "--host", HOST_B],
                             capture_output=True, text=True, timeout=60)
    assert trusted.returncode == 0, trusted.stderr
    logs = [tmp_path / "host-a.log", tmp_path / "host-b.log"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with two_hosts() as (ns_a, ns_b):
            procs.append(in_ns(ns_a, [
                sys.executable, "-m", "meshd", "up", "--prefill", "1", "--decode", "0",
                "--duration", "300", "--port", str(GATEWAY_PORT), "--grpc-port", str(GRPC_PORT),
                "--metrics-port", "0"], {
                **common, "MESHD_COORDINATOR_STATE_DIR": str(coord),
                "MESHD_AGENT_STATE_DIR": str(agent_a), "MESHD_COORDINATOR_GRPC_HOST": HOST_A,
                "MESHD_AGENT_HOST": HOST_A, "MESHD_GATEWAY_ROUTING_PD_MIN_UNCACHED_TOKENS": "0",
                "MESHD_WORKERS_BASE_PORT": "8100"}, logs[0]))
            wait("meshd up on host A", lambda: "meshd is up" in logs[0].read_text(
                errors="replace"), 240, logs)
            procs.append(in_ns(ns_b, [
                sys.executable, "-m", "meshd", "agent", "--coordinator",
                f"{HOST_A}:{GRPC_PORT}", "--state-dir", str(agent_b), "--host", HOST_B], {
                **common, "MESHD_WORKERS_PREFILL": "0", "MESHD_WORKERS_DECODE": "1",
                "MESHD_WORKERS_BASE_PORT": str(B_BASE_PORT)}, logs[1]))

            def routing() -> Any:
                got = http_get(ns_a, f"http://127.0.0.1:{GATEWAY_PORT}/debug/workers")
                if not got["ok"]:
                    return None
                workers = json.loads(got["body"])["workers"]
                roles = {w["role"]: w for w in workers if w.get("healthy")}
                return roles if {"prefill", "decode"} <= set(roles) else None

            roles = wait("the gateway routing to both hosts' workers", routing, 180, logs)
            assert roles["decode"]["node_id"] != roles["prefill"]["node_id"]  # two nodes

            # Each gateway replica refreshes its routing set on its own (every second): the
            # one that answered above sees B's worker, the kernel may hand the request to the
            # other. Fresh prompts until one is disaggregated (P on A, D on B).
            pulled, out = 0.0, {}
            for attempt in range(10):
                out = ns_python(ns_a, f"""
import json, urllib.request
body = json.dumps({{"model": "meshd-tiny", "prompt": {f"{attempt} {PROMPT}"!r},
                    "max_tokens": 8, "temperature": 0}}).encode()
req = urllib.request.Request("http://127.0.0.1:{GATEWAY_PORT}/v1/completions", body,
                             {{"content-type": "application/json"}})
with urllib.request.urlopen(req, timeout=120) as r:
    print(r.read().decode())
""", timeout=180)
                assert out["usage"]["completion_tokens"] == 8 and out["choices"][0]["text"]
                d_metrics = http_get(ns_b, f"http://{HOST_B}:{B_BASE_PORT}/metrics")
                assert d_metrics["ok"], d_metrics
                pulled = metric(d_metrics["body"], "meshd_engine_kv_transfer_pulls_total")
                if pulled >= 1:
                    break
                time.sleep(0.5)
            assert pulled >= 1, "no request was decoded on host B with host A's KV"
            assert metric(d_metrics["body"], "meshd_engine_kv_transfer_pulled_bytes_total") > 0
            g_metrics = http_get(ns_a, f"http://127.0.0.1:{GATEWAY_PORT}/metrics")
            assert 'meshd_prefill_total{mode="disaggregated"}' in g_metrics["body"]
            # host B cannot be reached from outside the link: nothing here leaked to the host
            assert not http_get(ns_b, f"http://127.0.0.1:{GATEWAY_PORT}/health")["ok"]

            status = subprocess.run(["ip", "netns", "exec", ns_a, sys.executable, "-m",
                                     "meshd", "status", "--json", "--state-dir", str(coord),
                                     "--coordinator", f"{HOST_A}:{GRPC_PORT}"],
                                    capture_output=True, text=True, timeout=60,
                                    env={**os.environ, **common})
            assert status.returncode == 0, status.stderr
            nodes = json.loads(status.stdout).get("nodes", [])
            assert sum(1 for n in nodes if n.get("state") == "alive") == 2, nodes
    finally:
        stop(procs)
        shutil.rmtree(ray_tmp, ignore_errors=True)
