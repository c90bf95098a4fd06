"""`meshd status` in a real subprocess prints the gateway's cache-routing health: an in-process
control server, an in-process gateway replica and a KV event publisher posing as a worker."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from support.control import control_server, make_config
from support.net import free_port

from meshd.capabilities import Member, Worker
from meshd.coordinator.actors import ensure_admin_key
from meshd.coordinator.gateway.config import GatewayConfig
from meshd.coordinator.gateway.runtime import GatewayRuntime
from meshd.node_agent.engine.kv_publisher import BlockStored, KVEventPublisher
from meshd.scheduler.block_hash import block_hashes, to_int64


def meshd(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshd", *args], capture_output=True,
                          text=True, timeout=90, env={**os.environ, **env})


def health(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/cache-health", timeout=2) as r:
        out: dict[str, Any] = json.loads(r.read())
        return out


async def test_status_prints_cache_routing_section(tmp_path: Path) -> None:
    pub = KVEventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    w = Worker("w-good", f"http://127.0.0.1:{free_port()}", "both", "m", engine="vllm",
               kv_events_endpoint=pub.endpoint,
               kv_events_replay_endpoint=pub.replay_endpoint or "")

    async def members() -> list[Member]:
        return [Member("n-1", w)]

    port = free_port()
    rt = GatewayRuntime(GatewayConfig(port=port, membership_interval_s=60), members)
    tokens = list(range(32))
    hashes = [to_int64(h) for h in block_hashes(tokens, 16, "0")]
    async with control_server(make_config(tmp_path / "coord")) as run:
        ensure_admin_key(str(tmp_path / "coord"), run.store)
        await rt.start()
        try:
            for _ in range(100):  # the SUB socket joins late: publish until a batch lands
                pub.publish([BlockStored(hashes, None, tokens, 16)])
                await asyncio.sleep(0.05)
                if (await asyncio.to_thread(health, port))["workers"][0]["batches_seen"]:
                    break
            args = ("status", "--state-dir", str(tmp_path / "coord"),
                    "--coordinator", run.address)
            out = await asyncio.to_thread(meshd, *args, MESHD_GATEWAY_PORT=str(port))
            assert out.returncode == 0, out.stderr
            print(out.stdout)
            lines = out.stdout.splitlines()
            head = lines.index(f"cache routing (gateway 127.0.0.1:{port}): ok")
            assert lines.index("(no nodes registered)") < head
            assert lines[head + 1].split() == ["WORKER", "EVENTS", "LAST", "EVENT", "ISSUES"]
            row = lines[head + 2].split()
            assert row[0] == "w-good" and int(row[1]) >= 1 and row[-1] == "-"

            js = await asyncio.to_thread(meshd, *args, "--json", MESHD_GATEWAY_PORT=str(port))
            assert js.returncode == 0, js.stderr
            cr = json.loads(js.stdout)["cache_routing"]
            assert cr["reachable"] is True and cr["ok"] is True
            assert cr["workers"][0]["worker_id"] == "w-good"
        finally:
            await rt.stop(2)
            pub.close()

        down = free_port()
        out = await asyncio.to_thread(meshd, *args, MESHD_GATEWAY_PORT=str(down))
        assert out.returncode == 0 and "Traceback" not in out.stderr + out.stdout
        lines = out.stdout.strip().splitlines()
        assert any(line.startswith(f"cache routing: gateway 127.0.0.1:{down} unreachable")
                   for line in lines)
        assert any(line.startswith(f"governance: gateway 127.0.0.1:{down} unreachable")
                   for line in lines)
        assert lines[-1].startswith(f"requests: gateway 127.0.0.1:{down} unreachable")
        js = await asyncio.to_thread(meshd, *args, "--json", MESHD_GATEWAY_PORT=str(down))
        cr = json.loads(js.stdout)["cache_routing"]
        assert cr["reachable"] is False and cr["error"]
