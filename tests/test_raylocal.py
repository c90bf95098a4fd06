"""Ray bootstrap (`meshd/raylocal.py`): with the defaults, a head meshd starts uses token auth
and keeps every Ray port on loopback; the Jobs API refuses a caller without the token."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support.net import free_port

from meshd import raylocal
from meshd.config import RayConfig


def test_auth_env_token_is_created_once_private(tmp_path: Path) -> None:
    env = raylocal.auth_env(RayConfig(), str(tmp_path / "state"))
    path = Path(env["RAY_AUTH_TOKEN_PATH"])
    assert env["RAY_AUTH_MODE"] == "token" and path == tmp_path / "state" / "ray_auth_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text()) == 64
    token = path.read_text()
    assert raylocal.auth_env(RayConfig(), str(tmp_path / "state")) == env
    assert path.read_text() == token  # reused, not rotated
    assert raylocal.auth_env(RayConfig(auth_mode="disabled"), str(tmp_path)) == {
        "RAY_AUTH_MODE": "disabled"}


@pytest.mark.parametrize(("bind_host", "env", "node", "head"), [
    ("127.0.0.1", {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, "127.0.0.1", "127.0.0.1:6379"),
    ("localhost", {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, "localhost", "127.0.0.1:6379"),
    ("::1", {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, "::1", "127.0.0.1:6379"),
    ("0.0.0.0", {}, None, "127.0.0.1:6379"),
    ("::", {}, None, "127.0.0.1:6379"),
    ("10.0.0.10", {}, "10.0.0.10", "10.0.0.10:6379"),
    ("fd00::10", {}, "fd00::10", "[fd00::10]:6379"),
])
def test_bind_host_maps_to_ray_settings(bind_host: str, env: dict[str, str], node: str | None,
                                        head: str) -> None:
    cfg = RayConfig(bind_host=bind_host)
    assert raylocal.bind_env(cfg) == env
    assert raylocal.node_address(cfg) == node
    assert raylocal.head_address(cfg, 6379) == head


def test_start_head_command_binds_loopback(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_run(cmd: list[str], env: dict[str, str], **kw: Any) -> Any:
        seen.update(cmd=cmd, env=env)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(raylocal.shutil, "which", lambda _: "/bin/ray")
    monkeypatch.setattr(raylocal.subprocess, "run", fake_run)
    assert raylocal.start_head(RayConfig(), str(tmp_path), 7379) == "127.0.0.1:7379"
    assert "--node-ip-address=127.0.0.1" in seen["cmd"]
    assert "--dashboard-host=127.0.0.1" in seen["cmd"] and "--port=7379" in seen["cmd"]
    assert seen["env"]["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert seen["env"]["RAY_AUTH_MODE"] == "token"
    assert seen["env"]["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "ray_auth_token")
    raylocal.start_head(RayConfig(bind_host="0.0.0.0", auth_mode="disabled"), str(tmp_path))
    assert not any(a.startswith("--node-ip-address") for a in seen["cmd"])
    assert seen["env"]["RAY_AUTH_MODE"] == "disabled"


# Runs in its own process: the test session's Ray (tests/conftest.py) is a different one, with
# auth disabled. `import ray` comes first, as in `meshd up`, so raylocal must refresh what Ray
# read at import. Prints one JSON line; Ray is shut down before it exits.
_SCRIPT = r'''
import json, os, socket, sys, time, urllib.error, urllib.request
import ray
from meshd import raylocal
from meshd.config import RayConfig

state, dash = sys.argv[1], int(sys.argv[2])

def descendants(root):
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                kids = open(f"/proc/{pid}/task/{t}/children").read().split()
            except OSError:
                continue
            for k in map(int, kids):
                if k not in out:
                    out.add(k)
                    todo.append(k)
    return out

def listening(pids):
    """(address, port, pid) of every listening TCP socket the processes hold (/proc)."""
    inodes = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes[link[8:-1]] = pid
    out = []
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in open(f"/proc/net/{name}").read().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                continue
            host, port = f[1].split(":")
            raw = bytes.fromhex(host)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            out.append((socket.inet_ntop(family, raw), int(port, 16), inodes[f[9]]))
    return out

def call(method, path, body=None, token=None):
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = "Bearer " + token
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{dash}{path}", data, headers,
                                 method=method)
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()

cfg = RayConfig(dashboard_port=dash, num_cpus=1, namespace="meshd-raylocal-test")
ctx = raylocal.init(cfg, state)
try:
    @ray.remote
    class Echo:
        def ping(self, x):
            return x

    echo = Echo.remote()
    pong = ray.get(echo.ping.remote(7), timeout=60)
    token = open(os.environ["RAY_AUTH_TOKEN_PATH"]).read().strip()
    deadline = time.monotonic() + 60
    while True:  # the dashboard's Jobs module may answer a moment after ray.init
        listed = call("GET", "/api/jobs/", token=token)
        if listed[0] == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    result = {
        "pong": pong,
        "node_ip": ctx.address_info["node_ip_address"],
        "gcs": ctx.address_info["gcs_address"],
        "token_path": os.environ["RAY_AUTH_TOKEN_PATH"],
        "listed_before": listed,
        "no_token": call("POST", "/api/jobs/", {"entrypoint": "id"}),
        "bad_token": call("POST", "/api/jobs/", {"entrypoint": "id"}, token="0" * 64),
        # passes the auth check, then is refused as a request without an entrypoint
        "token_invalid_job": call("POST", "/api/jobs/", {}, token=token)[0],
        "listed_after": call("GET", "/api/jobs/", token=token),
    }
    pids = descendants(os.getpid()) | {os.getpid()}
    result["listening"] = listening(pids)
    result["pids"] = sorted(pids - {os.getpid()})
finally:
    ray.shutdown()
print("RESULT " + json.dumps(result), flush=True)
'''


def _is_loopback(addr: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_default_local_head_is_token_auth_on_loopback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "MESHD_"))
           and k != raylocal.SINGLE_HOST_VAR}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    state = tmp_path / "state"
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, str(state), str(free_port())],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    lines = [li for li in out.splitlines() if li.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, out
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["pong"] == 7  # meshd's ray.init and an actor work in token mode
    assert r["token_path"] == str(state / "ray_auth_token")
    assert r["node_ip"] == "127.0.0.1" and r["gcs"].startswith("127.0.0.1:")
    ports = {port for _, port, _ in r["listening"]}
    assert int(r["gcs"].rsplit(":", 1)[1]) in ports and len(r["listening"]) >= 4, r
    assert [s for s in r["listening"] if not _is_loopback(s[0])] == [], r["listening"]
    assert r["no_token"][0] == 401, r["no_token"]
    assert r["bad_token"][0] == 403, r["bad_token"]
    assert r["token_invalid_job"] == 400
    assert r["listed_before"][0] == 200 and r["listed_after"][0] == 200
    submitted = [j for j in json.loads(r["listed_after"][1]) if j["type"] != "DRIVER"]
    assert submitted == []  # the refused requests submitted nothing
    deadline = time.monotonic() + 30  # ray.shutdown() ends the head's processes
    while time.monotonic() < deadline and any(_alive(p) for p in r["pids"]):
        time.sleep(0.5)
    assert [p for p in r["pids"] if _alive(p)] == []
