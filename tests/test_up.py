"""The README's first command (`meshd up`) and a real agent daemon's lifecycle, as processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.net import free_port

from meshd.coordinator.store import Store


def test_meshd_up_serves_the_openai_api_and_stops_cleanly(tmp_path: Path) -> None:
    """The README's first command: a local mesh answering the `openai` client."""
    import openai

    port, grpc_port, base = free_port(), free_port(), free_port()
    env = {**os.environ, "MESHD_COORDINATOR_STATE_DIR": str(tmp_path / "coord"),
           "MESHD_AGENT_STATE_DIR": str(tmp_path / "agent"), "MESHD_RAY_INCLUDE_DASHBOARD": "0",
           "MESHD_RAY_NUM_CPUS": "1", "MESHD_RAY_NAMESPACE": "meshd-up-test",
           "MESHD_WORKERS_BASE_PORT": str(20000 + base % 20000),
           "MESHD_GATEWAY_ROUTING_PD_MIN_UNCACHED_TOKENS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "meshd", "up", "--duration", "600",
                             "--grpc-port", str(grpc_port), "--metrics-port", "0",
                             "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            out.append(line)
            if "meshd is up" in line:
                break
        assert any("meshd is up" in li for li in out), "".join(out)
        assert f"http://127.0.0.1:{port}/v1" in "".join(out)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                               max_retries=0, timeout=60)
        chat = client.chat.completions.create(
            model="meshd-tiny", messages=[{"role": "user", "content": "hello mesh " * 20}],
            max_tokens=6, temperature=0)
        assert chat.usage is not None and chat.usage.completion_tokens >= 1
        comp = client.completions.create(model="meshd-tiny", prompt="hello " * 30,
                                         max_tokens=4, temperature=0, stream=True)
        assert sum(len(c.choices) for c in comp) >= 1
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        rest, _ = proc.communicate(timeout=90)
        out.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(out)
    assert proc.returncode == 0, text
    assert text.rstrip().endswith("stopped"), text
    store = Store(tmp_path / "coord")
    assert [n.state for n in store.nodes()] == ["left"]  # the agent deregistered on the way out
    store.close()
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", 20000 + base % 20000))  # the workers are gone


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
