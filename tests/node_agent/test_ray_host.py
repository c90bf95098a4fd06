"""Workers hosted by a Ray actor pinned to the agent's node (`agent.supervise = "ray"`), on the
shared real Ray instance: the actor is placed on our node, the supervisor inside it runs a real
worker process with a real health endpoint, readiness reaches the agent side, and stop ends
both the worker and the actor. A node that does not exist is a clear error, not a hang."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from support.control import wait_for
from support.net import free_port
from support.workers import health_worker, pid_alive

from meshd.config import AgentConfig, ConfigError
from meshd.node_agent.ray_host import HostError, RaySupervisor, actor_name


async def test_workers_run_under_an_actor_on_our_node(ray_session: Any, tmp_path: Path) -> None:
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    sup = RaySupervisor([health_worker(tmp_path, life=120.0)], tmp_path / "logs", node_id,
                        refresh_s=0.2)
    await sup.start()
    try:
        assert sup.where["node_id"] == node_id and sup.where["pid"] != os.getpid()
        assert ray.get_actor(actor_name(node_id)) is not None  # named, so the dashboard shows it
        assert await sup.wait_ready(30)
        assert [w.worker_id for w in sup.ready_workers()] == ["w0"]
        await wait_for(lambda: bool(sup.describe()) and sup.describe()[0]["pid"], 10)
        pid = sup.describe()[0]["pid"]
        assert pid_alive(pid)
        assert (tmp_path / "logs" / "w0.log").read_text().startswith("serving")
    finally:
        await sup.stop(grace_s=5)
    assert sup.ready_workers() == ()
    await wait_for(lambda: not pid_alive(pid), 10)
    with pytest.raises(ValueError):
        ray.get_actor(actor_name(node_id))  # the actor is gone too


async def test_an_unknown_node_is_a_clear_error(ray_session: Any, tmp_path: Path) -> None:
    sup = RaySupervisor([health_worker(tmp_path, life=120.0)], tmp_path / "logs", "ab" * 28,
                        start_timeout_s=3)
    with pytest.raises(HostError, match="could not start on Ray node abab"):
        await sup.start()
    await sup.stop()  # nothing left to stop: a no-op


def test_supervise_mode_is_validated() -> None:
    assert AgentConfig(supervise="ray").supervise == "ray"
    assert AgentConfig().supervise == "auto"  # ray in a process on Ray (meshd up), else process
    with pytest.raises(ConfigError, match=r"agent\.supervise"):
        AgentConfig(supervise="systemd")


async def test_agent_daemon_reports_ray_hosted_workers(ray_session: Any, tmp_path: Path) -> None:
    """`meshd agent` with supervise = "ray": a real embedded engine worker runs under the actor
    on our node, and the coordinator sees it, with the agent's Ray node id, in the report."""
    import asyncio
    import dataclasses

    import ray
    from support.control import control_server, make_config

    from meshd.config import MeshConfig, WorkersConfig
    from meshd.node_agent import daemon
    from meshd.node_agent.identity import Identity

    node_id = ray.get_runtime_context().get_node_id()
    async with control_server(make_config(tmp_path / "coord")) as run:
        ident = Identity.generate()
        run.store.add_key(ident.public_key, ident.node_id)
        base = MeshConfig()
        cfg = dataclasses.replace(
            base,
            agent=AgentConfig(coordinator=run.address, state_dir=str(tmp_path / "agent"),
                              host="127.0.0.1", supervise="ray", rpc_timeout_s=2.0,
                              reconnect_max_backoff_s=0.5),
            workers=WorkersConfig(both=1, base_port=free_port(), num_blocks=64))
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(cfg, ident, stop))
        table = run.server.plane.table
        try:
            await wait_for(lambda: ident.node_id in table.nodes
                           and bool(table.nodes[ident.node_id].capabilities.workers), 90)
            report = table.nodes[ident.node_id].capabilities
            assert report.ray_node_id == node_id
            assert [w.role for w in report.workers] == ["both"]
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
        assert ray.is_initialized()  # the agent joined the test's Ray, so it left it running


async def test_workers_die_with_a_killed_actor(ray_session: Any, tmp_path: Path) -> None:
    """An ungraceful end (Ray kills the actor, as when the agent dies) does not orphan the
    workers: they get SIGTERM from the kernel (PR_SET_PDEATHSIG)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    sup = RaySupervisor([health_worker(tmp_path, life=120.0)], tmp_path / "logs", node_id,
                        refresh_s=0.2)
    await sup.start()
    try:
        assert await sup.wait_ready(30)
        pid = sup.describe()[0]["pid"]
        ray.kill(ray.get_actor(actor_name(node_id)))
        await wait_for(lambda: not pid_alive(pid), 15)
        await wait_for(lambda: sup.ready_workers() == (), 10)  # the refresh notices
        # ... and makes the host again: the worker is back, a new process
        await wait_for(lambda: sup.recreated == 1 and bool(sup.ready_workers()), 60)
        await wait_for(lambda: bool(sup.describe()) and bool(sup.describe()[0]["pid"]), 10)
        assert sup.describe()[0]["pid"] != pid and pid_alive(sup.describe()[0]["pid"])
    finally:
        await sup.stop(grace_s=1)


ROLE_SERVER = """
import http.server, sys
port, running = int(sys.argv[1]), sys.argv[2].encode()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        metrics = self.path == "/metrics"
        body = b"vllm:num_requests_running " + running + b"\\n" if metrics else b"ok"
        self.send_response(200 if self.path in ("/health", "/metrics") else 404)
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def role_worker(tmp: Path, running: int, drain_timeout_s: float) -> Any:
    """Worker "n1-b0" (role both) whose /metrics show `running` requests."""
    import sys

    from meshd.capabilities import Worker
    from meshd.node_agent.supervisor import WorkerSpec

    port = free_port()
    (tmp / "role_srv.py").write_text(ROLE_SERVER)
    return WorkerSpec(Worker("n1-b0", f"http://127.0.0.1:{port}", "both", "tiny"),
                      (sys.executable, str(tmp / "role_srv.py"), str(port), str(running),
                       "--role", "both"), f"http://127.0.0.1:{port}/health",
                      health_interval_s=0.2, drain_timeout_s=drain_timeout_s)


async def test_a_busy_ray_hosted_worker_keeps_its_role(ray_session: Any,
                                                       tmp_path: Path) -> None:
    """One that does not drain in time is served again under its old id and spec."""
    import ray

    from meshd.node_agent.launcher import respec

    spec = role_worker(tmp_path, running=1, drain_timeout_s=2)
    node_id = ray.get_runtime_context().get_node_id()
    sup = RaySupervisor([spec], tmp_path / "logs", node_id, refresh_s=0.2, respec=respec)
    await sup.start()
    try:
        assert await sup.wait_ready(30)
        assert sup.rerole("n1-b0", "decode") and sup.ready_workers() == ()
        await wait_for(lambda: [w.worker_id for w in sup.ready_workers()] == ["n1-b0"], 40)
        assert sup.specs == [spec]  # a host made again would run it in its old role
        assert sup.rerole("n1-b0", "decode")  # and it may be asked again
    finally:
        await sup.stop(grace_s=2)


async def test_a_ray_hosted_worker_changes_role(ray_session: Any, tmp_path: Path) -> None:
    """`rerole` on the agent side: the worker leaves `ready_workers` at once, the actor's
    supervisor drains it (its /metrics show nothing running) and restarts it in the new role
    under the slot's new id (`launcher.respec`); a host made again would run that spec."""
    import ray

    from meshd.node_agent.launcher import respec

    spec = role_worker(tmp_path, running=0, drain_timeout_s=20)
    node_id = ray.get_runtime_context().get_node_id()
    sup = RaySupervisor([spec], tmp_path / "logs", node_id, refresh_s=0.2, respec=respec)
    await sup.start()
    try:
        assert await sup.wait_ready(30)
        assert not sup.rerole("n1-b0", "both") and not sup.rerole("nope", "decode")
        assert sup.rerole("n1-b0", "decode")
        assert sup.ready_workers() == ()  # out of the report at once
        assert not sup.rerole("n1-b0", "prefill")  # a change under way already
        await wait_for(lambda: [(w.worker_id, w.role) for w in sup.ready_workers()]
                       == [("n1-d0", "decode")], 60)
        assert [(s.worker.worker_id, s.argv[-1]) for s in sup.specs] == [("n1-d0", "decode")]
    finally:
        await sup.stop(grace_s=2)


def test_the_host_actor_repr_lists_its_workers() -> None:
    from meshd.capabilities import Worker
    from meshd.node_agent.ray_host import describe_workers

    ws = [Worker(f"w{i}", f"http://h:{i}", "decode", "m") for i in range(6)]
    assert describe_workers(ws[:2]) == "meshd workers: w0 decode m http://h:0, w1 decode m http://h:1"
    assert describe_workers(ws).endswith("w3 decode m http://h:3, +2 more")
    assert describe_workers([]) == "meshd workers: none"


def make_env_worker(tmp_path: Path, out: Path) -> Any:
    """`health_worker`, writing its OMP_NUM_THREADS (or "unset") to `out` first."""
    import dataclasses
    import sys

    spec = health_worker(tmp_path, life=120.0)
    code = (f"import os, sys; open({str(out)!r}, 'w').write("
            "os.environ.get('OMP_NUM_THREADS', 'unset')); "
            "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
    return dataclasses.replace(spec, argv=(sys.executable, "-c", code, *spec.argv[1:]))


@pytest.mark.parametrize("agent_value", [None, "3"])
async def test_workers_get_the_agents_omp_threads_not_rays(
        ray_session: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        agent_value: str | None) -> None:
    """Ray sets OMP_NUM_THREADS=1 in a CPU-less actor; the workers must see the agent's (a CPU
    engine on one thread otherwise). The actor's repr (what the dashboard shows) names them."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    if agent_value is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", agent_value)
    out = tmp_path / "omp"
    node_id = ray.get_runtime_context().get_node_id()
    sup = RaySupervisor([make_env_worker(tmp_path, out)], tmp_path / "logs", node_id,
                        refresh_s=0.2)
    await sup.start()
    try:
        assert await sup.wait_ready(30)
        assert out.read_text() == (agent_value or "unset")
        raw = state._connect_and_get_accessor().get_actor_info(
            ray.get_actor(actor_name(node_id))._actor_id)
        shown = gcs_pb2.ActorTableData.FromString(raw).repr_name
        assert shown == "meshd workers: w0 both tiny " + sup.specs[0].worker.endpoint
    finally:
        await sup.stop(grace_s=5)


def test_auto_supervises_under_ray_in_a_process_on_ray(ray_session: Any) -> None:
    from meshd.config import MeshConfig
    from meshd.node_agent.daemon import supervise_mode

    assert supervise_mode(MeshConfig()) == "ray"  # this process is on the test's Ray
    for mode in ("process", "ray"):
        assert supervise_mode(MeshConfig(agent=AgentConfig(supervise=mode))) == mode
