"""Disconnect propagation, graceful shutdown, SO_REUSEPORT replicas, handler contract."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from meshd.coordinator.gateway.config import GatewayConfig
from meshd.coordinator.gateway.http.api_request import ApiRequest
from meshd.coordinator.gateway.http.errors import rate_limited
from meshd.coordinator.gateway.http.responder import Responder
from meshd.coordinator.gateway.http.server import GatewayServer

ROOT = Path(__file__).resolve().parents[4]


def stream_request(extra: dict[str, Any]) -> bytes:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}],
                       "stream": True, **extra}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
            b"\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))


def wait_for(cond: Any, timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_client_disconnect_cancels_worker_stream(stack: Any) -> None:
    be = stack.backend
    aborted = be.stats["aborted"]
    disconnects = stack.server.stats.disconnects
    sk = socket.create_connection(("127.0.0.1", stack.port), timeout=5)
    sk.sendall(stream_request({"fake_delay": 0.05, "fake_chunks": 200}))
    assert b"data: " in sk.recv(65536)  # the stream is flowing
    sk.close()
    assert wait_for(lambda: be.stats["aborted"] == aborted + 1), "worker never saw the close"
    assert stack.server.stats.disconnects == disconnects + 1
    assert wait_for(lambda: stack.server.stats.in_flight == 0)


def test_graceful_shutdown_drains_in_flight(loop_thread: Any, stack_factory: Any) -> None:
    s = stack_factory(GatewayConfig())
    sk = socket.create_connection(("127.0.0.1", s.port), timeout=5)
    sk.sendall(stream_request({"fake_delay": 0.02, "fake_chunks": 20}))
    assert sk.recv(65536).startswith(b"HTTP/1.1 200")
    fut = asyncio.run_coroutine_threadsafe(s.server.shutdown(5.0), loop_thread.loop)
    data = b""
    while not data.endswith(b"0\r\n\r\n"):
        chunk = sk.recv(65536)
        assert chunk, "stream cut short by shutdown"
        data += chunk
    assert b"data: [DONE]" in data
    fut.result(5)
    assert sk.recv(10) == b""  # closed after the in-flight response
    try:
        socket.create_connection(("127.0.0.1", s.port), timeout=1).close()
        raise AssertionError("still accepting")
    except OSError:
        pass


class _LimitHandler:
    async def handle(self, req: ApiRequest, responder: Responder) -> None:
        if req.model == "limited":
            raise rate_limited(retry_after=2)
        if req.model == "silent":
            return
        await responder.start_stream()
        await responder.send_event(b'{"x":1}')
        raise RuntimeError("boom")


def test_handler_contract_errors(loop_thread: Any) -> None:
    srv = GatewayServer(GatewayConfig(port=0), _LimitHandler())
    loop_thread.run(srv.start())
    try:
        def post(model: str) -> tuple[int, bytes, Any]:
            req = urllib.request.Request(
                f"http://127.0.0.1:{srv.port}/v1/completions", method="POST",
                data=json.dumps({"model": model, "prompt": "x"}).encode(),
                headers={"content-type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return r.status, r.read(), r.headers
            except urllib.error.HTTPError as e:
                return e.code, e.read(), e.headers

        st, body, hdrs = post("limited")
        assert st == 429 and hdrs["retry-after"] == "2"
        assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"
        assert post("silent")[0] == 500
        st, body, _ = post("stream-then-fail")
        assert st == 200 and b'"error"' in body and body.endswith(b"data: [DONE]\n\n")
    finally:
        loop_thread.run(srv.shutdown(1.0))


def test_two_processes_share_port_with_reuseport(stack: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "meshd.coordinator.gateway", "--port", str(port),
           "--backend", f"http://127.0.0.1:{stack.backend_port}"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout is not None and b"listening" in p.stdout.readline()
        prefixes = set()
        for _ in range(40):  # fresh connection each time: the kernel spreads them
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions", method="POST",
                data=b'{"model": "m", "prompt": "x"}', headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=5) as r:
                assert r.status == 200
                prefixes.add(r.headers["x-request-id"].rsplit("-", 1)[0])
        assert len(prefixes) == 2
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            assert p.wait(10) == 0  # SIGTERM drains and exits cleanly
