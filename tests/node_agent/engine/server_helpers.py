"""Helpers for the worker-server tests: real server processes, raw HTTP, a faulty TCP proxy."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

SECRET = "test-mesh-secret-0123456789"
SMALL = ["--num-blocks", "64", "--block-size", "16", "--max-model-len", "256", "--max-num-seqs",
         "8"]


def _word(line: str, pattern: str) -> str | None:
    m = re.search(pattern, line)
    return m.group(1) if m else None


@dataclass
class ServerProc:
    proc: subprocess.Popen[str]
    url: str
    kv_port: int | None
    events: str | None
    replay: str | None
    lines: list[str]

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code (0 for a graceful shutdown)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def make_server(*args: str, timeout_s: float = 60.0) -> ServerProc:
    """Start `python -m meshd.node_agent.engine.worker_server --port 0 ...` and wait for ready."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshd.node_agent.engine.worker_server", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        url = _word(line, r"meshd engine ready: (http://\S+)")
        if url:
            threading.Thread(target=_drain, args=(proc, lines), daemon=True).start()
            kv = _word(line, r" kv=\w+://\S+:(\d+)")
            return ServerProc(proc, url, int(kv) if kv else None, _word(line, r" events=(\S+)"),
                              _word(line, r" replay=(\S+)"), lines)
    proc.kill()
    raise RuntimeError("server did not start:\n" + "".join(lines))


def _drain(proc: subprocess.Popen[str], lines: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)


def http(url: str, body: Any = None, raw: bytes | None = None,
         headers: dict[str, str] | None = None, timeout_s: float = 60.0
         ) -> tuple[int, Any, dict[str, str]]:
    """(status, parsed JSON or text, headers) for GET (no body) or POST."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json",
                                                         **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            status, text, hdrs = r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        status, text, hdrs = e.code, e.read().decode(), dict(e.headers)
    try:
        return status, json.loads(text), hdrs
    except json.JSONDecodeError:
        return status, text, hdrs


def metrics(url: str) -> dict[str, float]:
    """`/metrics` samples by `name{labels}` (labels model_name/engine stripped)."""
    _, text, _ = http(url + "/metrics")
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            key = re.sub(r'model_name="[^"]*",engine="0",?', "", key).replace("{}", "")
            out[key] = float(value)
    return out


def wait_for(cond: Any, timeout_s: float = 10.0, every_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every_s)


def make_prompt(n: int, salt: int = 0) -> list[int]:
    return [(salt * 31 + 7 * i + 3) % 250 for i in range(n)]


class FaultProxy:
    """One-connection TCP proxy that flips a byte of, or cuts, the server->client stream at
    byte offset `at`."""

    def __init__(self, port: int, mode: str, at: int) -> None:
        self.target, self.mode, self.at = ("127.0.0.1", port), mode, at
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self._sock.accept()
            up = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(conn, up, False), daemon=True).start()
            self._pump(up, conn, True)

    def _pump(self, a: socket.socket, b: socket.socket, faulty: bool) -> None:
        offset = 0
        try:
            while data := a.recv(65536):
                end = offset + len(data)
                if faulty and offset <= self.at < end:
                    cut = self.at - offset
                    if self.mode == "cut":
                        b.sendall(data[:cut])
                        break
                    data = data[:cut] + bytes([data[cut] ^ 0x40]) + data[cut + 1:]
                b.sendall(data)
                offset = end
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._sock.close()
