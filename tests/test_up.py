"""The README's first command (`meshd up`) and a real agent daemon's lifecycle, as processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from support.net import free_port

from meshd.coordinator.store import Store
from meshd.node_agent import identity


def test_meshd_up_serves_status_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "MESHD_COORDINATOR_STATE_DIR": str(tmp_path / "coord"),
           "MESHD_AGENT_STATE_DIR": str(tmp_path / "agent"), "MESHD_RAY_INCLUDE_DASHBOARD": "0",
           "MESHD_RAY_NUM_CPUS": "1", "MESHD_RAY_NAMESPACE": "meshd-up-test"}
    out = subprocess.run([sys.executable, "-m", "meshd", "up", "--duration", "1",
                          "--grpc-port", str(port), "--metrics-port", "0"],
                         capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    ident = identity.load(tmp_path / "agent" / "node.key")
    assert f"control plane 127.0.0.1:{port}" in out.stdout
    row = next(li for li in out.stdout.splitlines() if li.startswith(ident.node_id))
    assert " alive " in row
    assert out.stdout.rstrip().endswith("stopped")
    store = Store(tmp_path / "coord")
    assert [n.state for n in store.nodes()] == ["left"]  # the agent deregistered on the way out
    store.close()


def test_agent_daemon_registers_and_leaves_on_sigterm(tmp_path: Path) -> None:
    import asyncio

    from support.control import control_server, make_config, wait_for

    async def scenario() -> None:
        async with control_server(make_config(tmp_path / "coord")) as run:
            token = run.store.create_token(60)
            proc = subprocess.Popen(
                [sys.executable, "-m", "meshd", "agent", "--state-dir", str(tmp_path / "agent"),
                 "--coordinator", run.address, "--join-token", token, "--attr", "zone=z1"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                table = run.server.plane.table
                await wait_for(lambda: len(table.nodes) == 1, 60)
                node = next(iter(table.nodes.values()))
                assert node.capabilities.attributes == {"zone": "z1"}
                assert node.state == "alive"
                proc.send_signal(signal.SIGTERM)
                t0 = time.monotonic()
                code = await asyncio.to_thread(proc.wait, 15)
                assert code == 0, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() - t0 < 5
                assert node.state == "left"
            finally:
                if proc.poll() is None:
                    proc.kill()

    asyncio.run(scenario())
