"""The worker supervisor with real child processes serving a real health endpoint."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from support.control import wait_for
from support.workers import health_worker

from meshd.node_agent.supervisor import Supervisor, WorkerSpec


async def test_ready_restart_and_stop(tmp_path: Path) -> None:
    sup = Supervisor([health_worker(tmp_path, life=1.5, max_backoff_s=0.5)], tmp_path / "logs")
    await sup.start()
    try:
        assert await sup.wait_ready(20)
        assert [w.worker_id for w in sup.ready_workers()] == ["w0"]
        first_pid = sup.states["w0"].proc.pid  # type: ignore[union-attr]
        await wait_for(lambda: sup.states["w0"].restarts >= 1, 20)  # it exits after 1.5 s
        assert sup.states["w0"].last_exit == 0
        await wait_for(lambda: sup.states["w0"].ready, 20)
        assert sup.states["w0"].proc.pid != first_pid  # type: ignore[union-attr]
    finally:
        await sup.stop(grace_s=2)
    proc = sup.states["w0"].proc
    assert proc is not None and proc.returncode is not None
    log = (tmp_path / "logs" / "w0.log").read_text()
    assert log.count("serving") >= 2


async def test_never_ready_is_restarted_and_stop_kills_the_group(tmp_path: Path) -> None:
    s = health_worker(tmp_path, life=60, ready_timeout_s=0.5, max_backoff_s=0.2)
    bad = WorkerSpec(s.worker, s.argv, s.health_url.replace("/health", "/nope"),
                     health_interval_s=0.2, ready_timeout_s=0.5, max_backoff_s=0.2)
    sup = Supervisor([bad], tmp_path / "logs")
    await sup.start()
    try:
        await wait_for(lambda: sup.states["w0"].restarts >= 1, 20)
        assert not sup.states["w0"].ready
    finally:
        await sup.stop(grace_s=2)
    pid = sup.states["w0"].proc.pid  # type: ignore[union-attr]
    await asyncio.sleep(0.1)
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive


METRICS_SERVER = """
import http.server, sys, pathlib
port, busy = int(sys.argv[1]), pathlib.Path(sys.argv[2])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/metrics":
            body = ("vllm:num_requests_running %s\\nvllm:num_requests_waiting 0\\n"
                    % busy.read_text().strip()).encode()
        elif self.path == "/health":
            body = b"ok"
        else:
            self.send_response(404); self.end_headers(); return
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
print("serving", sys.argv[3], flush=True)
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def make_busy_worker(tmp: Path, busy: str) -> tuple[WorkerSpec, Path]:
    from support.net import free_port

    from meshd.capabilities import Worker

    port = free_port()
    (tmp / "msrv.py").write_text(METRICS_SERVER)
    flag = tmp / "busy"
    flag.write_text(busy)
    spec = WorkerSpec(Worker("node-p0", f"http://127.0.0.1:{port}", "prefill", "tiny"),
                      (sys.executable, str(tmp / "msrv.py"), str(port), str(flag), "prefill"),
                      f"http://127.0.0.1:{port}/health", health_interval_s=0.2,
                      drain_timeout_s=1.5)
    return spec, flag


def respec_for_test(spec: WorkerSpec, role: str) -> WorkerSpec:
    import dataclasses

    return dataclasses.replace(spec, worker=dataclasses.replace(
        spec.worker, worker_id=f"node-{role[0]}0", role=role), argv=(*spec.argv[:-1], role))


async def test_a_drained_worker_restarts_in_its_new_role(tmp_path: Path) -> None:
    spec, flag = make_busy_worker(tmp_path, "2")
    sup = Supervisor([spec], tmp_path / "logs", respec=respec_for_test, settle_s=0.1,
                     poll_s=0.1)
    await sup.start()
    try:
        assert await sup.wait_ready(20)
        first = sup.states["node-p0"].proc.pid  # type: ignore[union-attr]
        assert sup.rerole("node-p0", "decode")
        assert not sup.rerole("node-p0", "decode")  # one change at a time
        assert sup.ready_workers() == ()  # out of the routing set while it drains
        await asyncio.sleep(0.6)
        assert "node-p0" in sup.states  # busy: still draining, the same process
        flag.write_text("0")
        await wait_for(lambda: "node-d0" in sup.states and sup.states["node-d0"].ready, 20)
        st = sup.states["node-d0"]
        assert st.proc is not None and st.proc.pid != first and "node-p0" not in sup.states
        assert [(w.worker_id, w.role) for w in sup.ready_workers()] == [("node-d0", "decode")]
        assert st.role_changes == 1 and not st.draining
        assert "serving decode" in (tmp_path / "logs" / "node-d0.log").read_text()
    finally:
        await sup.stop(grace_s=2)


async def test_a_worker_that_does_not_drain_keeps_its_role(tmp_path: Path) -> None:
    spec, _ = make_busy_worker(tmp_path, "1")
    sup = Supervisor([spec], tmp_path / "logs", respec=respec_for_test, settle_s=0.1,
                     poll_s=0.1)
    await sup.start()
    try:
        assert await sup.wait_ready(20)
        pid = sup.states["node-p0"].proc.pid  # type: ignore[union-attr]
        assert sup.rerole("node-p0", "decode")
        await wait_for(lambda: not sup.states["node-p0"].draining, 10)  # gave up after 1.5 s
        assert sup.states["node-p0"].proc.pid == pid  # type: ignore[union-attr]
        assert [w.role for w in sup.ready_workers()] == ["prefill"]  # served again
        assert not Supervisor([spec], tmp_path).rerole("node-p0", "decode")  # no respec
    finally:
        await sup.stop(grace_s=2)
