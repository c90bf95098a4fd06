#!/usr/bin/env python3
"""Check what the Ray dashboard shows of meshd, in a real headless browser.

    .venv/bin/python scripts/dashboard_screenshot.py OUT.png [--actors-only] [--supervise ray]

Starts `meshd up` (its own Ray head with the dashboard on a free port, token auth, the registry,
ledger and gateway actors, one agent whose embedded workers run under a Ray actor with
`--supervise ray`) with state in a temporary directory, sends four completions, then:

- prints the meshd actors and their reprs as the dashboard's HTTP API (`/api/v0/actors`)
  lists them;
- prints the `ray_meshd_*` series that Ray's metrics agents export (targets from the
  dashboard's `/api/prometheus/sd`), once the bridge's first copies arrived;
- opens the dashboard's Actors page in headless Chromium (the DevTools protocol sets the
  dashboard's auth cookie from the token file), waits until the table lists the meshd actors
  and saves a screenshot to OUT.png.

`--actors-only`: instead of `meshd up`, only the coordinator actors (registry, ledger, one
gateway replica; no agent, no workers), which starts in seconds. The test
tests/test_ray_dashboard.py uses the same host (`--serve-actors DIR`, an internal mode: it
prints one JSON line and serves until its stdin closes). Chromium: `apt-get install chromium`.
Everything started is stopped at the end, Ray included (only this Ray: never `ray stop`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

NAMESPACE = "meshd-dashboard"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(probe: Callable[[], T | None], timeout_s: float, what: str,
             period_s: float = 1.0) -> T:
    """`probe()` until it returns something other than None (exceptions count as None)."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            got = probe()
            if got is not None:
                return got
        except (OSError, ValueError, KeyError) as e:
            last = e
        time.sleep(period_s)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f}s (last error: {last})")


# -- the dashboard's HTTP API -----------------------------------------------------------------

def http_get(url: str, token: str = "", timeout_s: float = 10.0) -> bytes:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                timeout=timeout_s) as r:
        return bytes(r.read())


def meshd_actors(dashboard: str, token: str) -> list[dict[str, str]]:
    """Alive actors named `meshd-*`, as the dashboard's state API lists them."""
    body = json.loads(http_get(f"{dashboard}/api/v0/actors?detail=1&limit=1000", token))
    rows = body["data"]["result"]["result"]
    return sorted(({"name": a.get("name") or "", "class": a.get("class_name") or "",
                    "state": a.get("state") or "", "repr": a.get("repr_name") or ""}
                   for a in rows if (a.get("name") or "").startswith("meshd-")
                   and a.get("state") == "ALIVE"), key=lambda a: a["name"])


def ray_meshd_series(dashboard: str, token: str) -> list[str]:
    """Every `ray_meshd_*` sample line the cluster's metrics agents export (the targets come
    from the dashboard's Prometheus service discovery; those ports need no token)."""
    groups = json.loads(http_get(f"{dashboard}/api/prometheus/sd", token))
    lines: list[str] = []
    for target in sorted({t for g in groups for t in g.get("targets", ())}):
        try:
            text = http_get(f"http://{target}/metrics", timeout_s=5).decode()
        except OSError:
            continue
        lines += [ln for ln in text.splitlines() if ln.startswith("ray_meshd_")]
    return lines


def short_series(line: str) -> str:
    """A sample line without Ray's own tags (session, worker id, ...): name{ours} value."""
    name, _, rest = line.partition("{")
    tags, _, value = rest.rpartition("} ")
    ours = [t for t in re.findall(r'(\w+)="([^"]*)"', tags)
            if t[0][0].islower() and not t[0].startswith("otel_")]
    return f"{name}{{{','.join(f'{k}={v}' for k, v in ours)}}} {value}"


# -- the meshd host: `meshd up`, or the coordinator actors alone ------------------------------

def serve_actors(state_dir: str) -> int:
    """The internal `--serve-actors` mode: a Ray head with the dashboard on a free port (token
    auth) and the coordinator actors as `meshd up` deploys them; one JSON line with where the
    dashboard is, then serve until stdin closes."""
    import dataclasses

    import ray

    from meshd import raylocal
    from meshd.config import CoordinatorConfig, GatewayConfig, RayConfig
    from meshd.coordinator import actors
    from meshd.coordinator.gateway import actor as gateways

    rcfg = RayConfig(dashboard_port=free_port(), num_cpus=1, namespace=NAMESPACE)
    coord = CoordinatorConfig(grpc_port=free_port(), metrics_port=0,
                              state_dir=str(Path(state_dir) / "coord"))
    ctx = raylocal.init(rcfg, coord.state_dir, "")
    try:
        actors.deploy(coord, rcfg.namespace)
        gcfg = dataclasses.replace(GatewayConfig(), port=free_port(), replicas=1)
        gateways.deploy(gcfg, rcfg.namespace, 60.0, coord.state_dir)
        print(json.dumps({"dashboard": f"http://{ctx.dashboard_url}",
                          "token_file": str(raylocal.token_path(coord.state_dir)),
                          "gateway": f"http://127.0.0.1:{gcfg.port}"}), flush=True)
        sys.stdin.read()
    finally:
        gateways.stop(rcfg.namespace)
        actors.stop(rcfg.namespace)
        ray.shutdown()
    return 0


def start_actors_host(tmp: Path, export_ms: int = 0
                      ) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """The `--serve-actors` host in a subprocess; `export_ms`: Ray's metrics export interval
    (Ray's default, 10 s, when 0)."""
    env = dict(os.environ)
    if export_ms:
        env["RAY_metrics_report_interval_ms"] = str(export_ms)
    proc = subprocess.Popen([sys.executable, __file__, "--serve-actors", str(tmp)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(30)
        raise RuntimeError(f"the actors host exited ({proc.returncode}) before it served")
    return proc, json.loads(line)


def start_up(tmp: Path, supervise: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """`meshd up` with its state in `tmp`, every port free; returns once it is up."""
    port, dash = free_port(), free_port()
    env = {**os.environ, "MESHD_COORDINATOR_STATE_DIR": str(tmp / "coord"),
           "MESHD_AGENT_STATE_DIR": str(tmp / "agent"), "MESHD_RAY_NAMESPACE": NAMESPACE,
           "MESHD_RAY_DASHBOARD_PORT": str(dash), "MESHD_RAY_NUM_CPUS": "1",
           "MESHD_AGENT_SUPERVISE": supervise, "MESHD_WORKERS_BASE_PORT": str(free_port())}
    proc = subprocess.Popen([sys.executable, "-m", "meshd", "up", "--grpc-port",
                             str(free_port()), "--metrics-port", "0", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    out: list[str] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        out.append(line)
        if "meshd is up" in line:
            return proc, {"dashboard": f"http://127.0.0.1:{dash}",
                          "token_file": str(tmp / "coord" / "ray_auth_token"),
                          "gateway": f"http://127.0.0.1:{port}"}
    stop_host(proc, signal.SIGKILL)
    raise RuntimeError("meshd up did not come up:\n" + "".join(out))


def stop_host(proc: subprocess.Popen[str], sig: int = signal.SIGINT) -> None:
    if proc.poll() is None:
        if proc.stdin is not None:
            proc.stdin.close()  # the actors host stops on EOF
        else:
            proc.send_signal(sig)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def send_requests(gateway: str, n: int = 4, retry_s: float = 15.0) -> None:
    """A few completions, so the request figures have something to show. A 404 is retried for
    `retry_s`: `meshd up` reports up once one replica lists the model, and a sibling may not
    have read the routing set yet."""
    body = json.dumps({"model": "meshd-tiny", "prompt": "Hello mesh " * 8, "max_tokens": 4})
    for _ in range(n):
        deadline = time.monotonic() + retry_s
        while True:
            req = urllib.request.Request(f"{gateway}/v1/completions", data=body.encode(),
                                         headers={"content-type": "application/json"})
            try:
                urllib.request.urlopen(req, timeout=60).read()
                break
            except urllib.error.HTTPError as e:
                if e.code != 404 or time.monotonic() > deadline:
                    print(f"request failed: {e}")
                    break
                time.sleep(0.5)
            except urllib.error.URLError as e:
                print(f"request failed: {e}")
                break


# -- the browser --------------------------------------------------------------------------------

class Chromium:
    """Headless Chromium driven over the DevTools protocol (aiohttp's websocket client)."""

    def __init__(self, exe: str, profile: Path, size: tuple[int, int]) -> None:
        self.size = size
        self.proc = subprocess.Popen(
            [exe, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
             "--remote-debugging-port=0", f"--user-data-dir={profile}",
             f"--window-size={size[0]},{size[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._ids = 0
        self.ws: Any = None
        self.session: Any = None

    def devtools_port(self, timeout_s: float = 30.0) -> int:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                break
            m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if m:
                return int(m.group(1))
        raise RuntimeError("chromium did not open its DevTools port")

    async def open(self) -> None:
        import aiohttp

        port = self.devtools_port()
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as r:
            pages = [t for t in await r.json() if t.get("type") == "page"]
        self.ws = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"],
                                                max_msg_size=64 << 20)

    async def call(self, method: str, timeout_s: float = 30.0, **params: Any) -> Any:
        self._ids += 1
        mine = self._ids
        await self.ws.send_json({"id": mine, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive_json(), timeout_s)
            if msg.get("id") == mine:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def text(self) -> str:
        got = await self.call("Runtime.evaluate", expression="document.body.innerText",
                              returnByValue=True)
        return str(got.get("result", {}).get("value", ""))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def screenshot(url: str, token: str, out: Path, expect: list[str],
                     size: tuple[int, int] = (1600, 1000), timeout_s: float = 60.0) -> str:
    """Open `url` with the dashboard's auth cookie, wait until the page's text holds every
    string in `expect`, save a PNG; returns the page text."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise RuntimeError("no chromium on PATH: apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="meshd-chromium-") as profile:
        browser = Chromium(exe, Path(profile), size)
        try:
            await browser.open()
            await browser.call("Emulation.setDeviceMetricsOverride", width=size[0],
                               height=size[1], deviceScaleFactor=1, mobile=False)
            if token:
                await browser.call("Network.setCookie", name="ray-authentication-token",
                                   value=token, url=url.split("#")[0], httpOnly=True)
            await browser.call("Page.navigate", url=url)
            deadline = time.monotonic() + timeout_s
            text = ""
            while time.monotonic() < deadline:
                text = await browser.text()
                if all(e in text for e in expect):
                    break
                await asyncio.sleep(1.0)
            else:
                print(f"warning: the page never showed all of {expect}")
            await asyncio.sleep(1.0)  # let the table finish rendering
            shot = await browser.call("Page.captureScreenshot", format="png")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(base64.b64decode(shot["data"]))
            return text
        finally:
            await browser.close()


# -- main ----------------------------------------------------------------------------------------

def workers_counted(lines: list[str]) -> bool:
    """Whether the registry's `ray_meshd_workers` series count any worker yet."""
    return any(float(ln.rsplit(" ", 1)[1]) > 0 for ln in lines
               if ln.startswith("ray_meshd_workers{"))


def report(host: dict[str, str], out: Path, timeout_s: float, workers: bool) -> int:
    """`workers`: also wait until the registry's worker counts reach Ray's export."""
    token = Path(host["token_file"]).read_text().strip()
    dash = host["dashboard"]
    print(f"dashboard: {dash} (token in {host['token_file']})")
    found = wait_for(lambda: (lambda a: a if len(a) >= 3 and all(x["repr"] for x in a)
                              else None)(meshd_actors(dash, token)), timeout_s, "meshd actors")
    print("actors (name | class | repr):")
    for a in found:
        print(f"  {a['name']} | {a['class']} | {a['repr']}")
    want = [f"ray_meshd_gateway_in_flight{{actor={a['name']}}}" for a in found
            if a["name"].startswith("meshd-gateway-")]
    want += ["ray_meshd_workers{actor=meshd-registry,",
             "ray_meshd_fleet_ledger_meters{actor=meshd-ledger}"]

    def every_actor_exported() -> list[str] | None:
        lines = [short_series(s) for s in ray_meshd_series(dash, token)]
        if not all(any(ln.startswith(w) for ln in lines) for w in want):
            return None
        return lines if workers_counted(lines) or not workers else None

    series = wait_for(every_actor_exported, timeout_s, "ray_meshd_* series of every actor",
                      period_s=3.0)
    print(f"ray.util.metrics series ({len(series)}):")
    for line in series:
        print(f"  {line}")
    text = asyncio.run(screenshot(f"{dash}/#/actors", token, out,
                                  [a["name"] for a in found]))
    shown = [a["name"] for a in found if a["repr"] in text]
    print(f"screenshot: {out} (reprs visible on the page for: {', '.join(shown) or 'none'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", type=Path, help="where to save the PNG")
    p.add_argument("--actors-only", action="store_true",
                   help="the coordinator actors alone, no agent and workers")
    p.add_argument("--supervise", choices=("ray", "process"), default="ray",
                   help="agent.supervise for `meshd up` (default ray: workers as an actor)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for each wait")
    p.add_argument("--serve-actors", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.serve_actors:
        return serve_actors(args.serve_actors)
    if args.out is None:
        p.error("OUT.png is required")
    with tempfile.TemporaryDirectory(prefix="meshd-dashboard-") as tmp:
        if args.actors_only:
            proc, host = start_actors_host(Path(tmp))
        else:
            proc, host = start_up(Path(tmp), args.supervise)
        try:
            if not args.actors_only:
                send_requests(host["gateway"])
            return report(host, args.out.resolve(), args.timeout, not args.actors_only)
        finally:
            stop_host(proc)


if __name__ == "__main__":
    sys.exit(main())
