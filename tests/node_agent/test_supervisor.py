"""The worker supervisor with real child processes serving a real health endpoint."""

from __future__ import annotations

import asyncio
import os
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
