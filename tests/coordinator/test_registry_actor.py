"""The registry as a named, detached Ray actor: serving, status, kill and recovery."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import ray
from support.control import make_agent, make_report, wait_for
from support.net import free_port

from meshd.capabilities import Worker
from meshd.config import CoordinatorConfig
from meshd.coordinator import actors
from meshd.coordinator.store import Store
from meshd.node_agent.identity import Identity


def meshd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshd", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


async def ready_after_restart(handle: Any, old_pid: int, timeout_s: float = 60) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            info = await asyncio.wait_for(handle.ready.remote(), 10)
            if info["pid"] != old_pid:
                return info
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError):
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("registry actor did not come back")
        await asyncio.sleep(0.2)


@pytest.fixture
def registry(ray_session: Any, state_dir: Path) -> Any:
    cfg = CoordinatorConfig(grpc_port=free_port(), metrics_port=0, state_dir=str(state_dir),
                            heartbeat_interval_s=0.2, suspect_after_s=1.0, dead_after_s=3.0)
    handle, info = actors.deploy(cfg, namespace="meshd-test")
    yield cfg, handle, info
    actors.stop("meshd-test")


async def test_actor_is_named_detached_and_serves(registry: Any, state_dir: Path) -> None:
    _, handle, info = registry
    rows = [a for a in ray._private.state.actors().values()
            if a["Name"] == actors.REGISTRY_NAME and a["State"] == "ALIVE"]
    assert len(rows) == 1 and rows[0]["IsDetached"]
    assert actors.find("meshd-test") is not None
    assert actors.find("some-other-namespace") is None
    ident = Identity.generate()
    out = meshd("trust", "add", ident.public_key.hex(), "--label", "t",
                env={"MESHD_COORDINATOR_STATE_DIR": str(state_dir)})
    assert out.returncode == 0, out.stderr
    assert f"trusted {ident.node_id}" in out.stdout
    w = Worker("w0", "http://127.0.0.1:8100", "decode", "tiny", kv_block_size=16)
    agent = make_agent(f"127.0.0.1:{info['grpc_port']}", ident,
                       report=make_report("host-a", (w,)))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await wait_for(lambda: agent.status.heartbeats >= 1, 15)
    routing = await handle.workers.remote()
    assert [(r["node_id"], r["worker"]["worker_id"], r["worker"]["role"]) for r in routing] == [
        (ident.node_id, "w0", "decode")]
    status = await asyncio.to_thread(
        meshd, "status", "--state-dir", str(state_dir), "--coordinator",
        f"127.0.0.1:{info['grpc_port']}")
    assert status.returncode == 0, status.stderr
    line = next(li for li in status.stdout.splitlines() if li.startswith(ident.node_id))
    assert " alive " in line and "host-a" in line
    counts = await handle.node_counts.remote()
    assert counts["alive"] == 1
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_killed_actor_restarts_recovers_and_agents_reattach(registry: Any,
                                                                  state_dir: Path) -> None:
    _, handle, info = registry
    store = Store(state_dir)
    agents = []
    for _ in range(2):
        ident = Identity.generate()
        store.add_key(ident.public_key, ident.node_id)
        agents.append(make_agent(f"127.0.0.1:{info['grpc_port']}", ident))
    revoked = Identity.generate()
    store.add_key(revoked.public_key, revoked.node_id)
    store.revoke_key(revoked.node_id)
    store.close()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(a.run(stop)) for a in agents]
    await wait_for(lambda: all(a.status.heartbeats >= 1 for a in agents), 15)

    ray.kill(handle, no_restart=False)  # Ray restarts it (max_restarts=-1)
    new_info = await ready_after_restart(handle, info["pid"])
    assert new_info["pid"] != info["pid"]
    assert new_info["grpc_port"] == info["grpc_port"]
    counts = await handle.node_counts.remote()
    # node records recovered from the store (with a 1 s suspect deadline and a slow restart
    # under load they may already be suspect: what matters is that they are there)
    assert counts["alive"] + counts["suspect"] + counts["dead"] == 2, counts
    marks = [a.status.heartbeats for a in agents]
    await wait_for(lambda: all(a.status.heartbeats > m for a, m in zip(agents, marks,
                                                                       strict=True)), 20)
    assert (await handle.node_counts.remote())["alive"] == 2  # re-attached
    assert all(a.status.registrations == 1 for a in agents)  # re-attached, no re-register
    store = Store(state_dir)
    rec = store.key(revoked.public_key)
    store.close()
    assert rec is not None and rec.state == "revoked"  # trust store recovered
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
