"""Test helpers: embedded engine worker processes and an in-process mesh gateway."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshd.capabilities import Member, Worker
from meshd.coordinator.gateway.config import Deadlines, GatewayConfig, RoutingConfig
from meshd.coordinator.gateway.http.server import GatewayServer
from meshd.coordinator.gateway.serving.mesh import MeshHandler
from meshd.coordinator.gateway.serving.prompts import PromptBuilder
from meshd.coordinator.gateway.serving.request_metrics import MeshMetrics
from meshd.coordinator.gateway.workers.pool import WorkerPool
from meshd.scheduler.pd import PDConfig, PDDecider
from meshd.scheduler.profiles import builtin
from meshd.scheduler.router import Router
from support.net import free_port


@dataclass
class EngineProc:
    worker: Worker
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return self.worker.endpoint

    def get(self, path: str) -> Any:
        """GET a JSON endpoint; one retry if the engine dropped the connection unanswered
        (seen once under heavy load on a debug read; the request is idempotent)."""
        for attempt in range(2):
            try:
                with urllib.request.urlopen(self.url + path, timeout=10) as r:
                    return json.loads(r.read())
            except http.client.RemoteDisconnected:
                if attempt:
                    raise
                time.sleep(0.2)
        raise AssertionError("unreachable")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, sig: int = signal.SIGSTOP) -> None:
        os.killpg(self.proc.pid, sig)


def worker_metric(url: str, name: str) -> float:
    """A sample of a worker's `/metrics` summed over its labels (a process of its own: a
    blocking read is fine from a test's event loop)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(
        rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def start_engine(wid: str, role: str, secret: Path, logdir: Path, lease_s: float = 3.0,
                 extra: Sequence[str] = ()) -> EngineProc:
    port, kv, ev, rp = (free_port() for _ in range(4))
    log = logdir / f"{wid}.log"
    argv = [sys.executable, "-m", "meshd", "engine", "serve", "--port", str(port),
            "--role", role, "--num-blocks", "256", "--kv-port", str(kv),
            "--kv-events-port", str(ev), "--kv-replay-port", str(rp),
            "--kv-secret-file", str(secret), "--engine-id", wid,
            "--lease-timeout-s", str(lease_s), *extra]
    proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    w = Worker(wid, f"http://127.0.0.1:{port}", role, "meshd-tiny", kv_block_size=16,
               kv_capacity_blocks=256, kv_events_endpoint=f"tcp://127.0.0.1:{ev}",
               kv_events_replay_endpoint=f"tcp://127.0.0.1:{rp}")
    return EngineProc(w, proc, log)


def wait_ready(engines: Sequence[EngineProc], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    for e in engines:
        while True:
            if e.proc.poll() is not None:
                raise RuntimeError(f"{e.worker.worker_id} exited:\n{e.log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(e.url + "/health", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{e.worker.worker_id} not ready") from None
                time.sleep(0.2)


@contextlib.contextmanager
def engines(specs: Sequence[tuple[str, str]], tmp: Path, **kw: Any) -> Iterator[list[EngineProc]]:
    secret = tmp / "kv_secret"
    if not secret.exists():
        secret.write_text("meshd-test-secret-0123456789abcdef\n")
        secret.chmod(0o600)
    procs = [start_engine(wid, role, secret, tmp, **kw) for wid, role in specs]
    try:
        wait_ready(procs)
        yield procs
    finally:
        for p in procs:
            p.kill()


def make_router(min_uncached_tokens: int = 0) -> Router:
    from meshd.scheduler.prefix_index import PrefixIndex

    return Router(decode=builtin("decode"), prefill=builtin("prefill"),
                  pd=PDDecider(PDConfig(min_uncached_tokens=min_uncached_tokens)),
                  index=PrefixIndex())


@contextlib.asynccontextmanager
async def gateway(workers: Sequence[Worker | Member], deadlines: Deadlines | None = None,
                  min_uncached_tokens: int = 0, api_keys: dict[str, str] | None = None
                  ) -> AsyncIterator[tuple[str, MeshHandler]]:
    """A gateway over `workers` (a bare `Worker` is a member of node "n-test")."""
    router = make_router(min_uncached_tokens)
    assert router.index is not None
    pool = WorkerPool(router.index, RoutingConfig(scrape_interval_s=0.2))
    pool.update(w if isinstance(w, Member) else Member("n-test", w) for w in workers)
    metrics = MeshMetrics()
    metrics.watch_workers(pool)
    handler = MeshHandler(pool, router, PromptBuilder(), deadlines, metrics)
    server = GatewayServer(GatewayConfig(port=free_port(), api_keys=api_keys or {}), handler,
                           registry=metrics.registry, models=handler.models)
    await pool.start()
    await pool.scrape_once()
    await server.start()
    try:
        yield f"http://127.0.0.1:{server.config.port}", handler
    finally:
        await server.shutdown(5)
        await pool.close()
