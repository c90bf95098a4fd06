"""Requests refused whatever their body (unknown route, wrong method): the body cap applies, a
short body is dropped and the connection kept, a long one is not read — the 404/405 goes out
at once and the connection closes. Raw sockets, so the bytes on the wire are what is tested."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any

import pytest

from meshd.coordinator.gateway.config import GatewayConfig, HttpConfig

BIG = 20 << 20  # 20 MiB: far past the 64 KiB drained and the 1 MiB cap below


def make_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: x", "content-type: application/json",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sk: socket.socket, deadline_s: float = 5.0) -> bytes:
    """One response (head + Content-Length body); b"" if the connection ends first."""
    sk.settimeout(deadline_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sk.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(int(ln.split(b":")[1]) for ln in head.split(b"\r\n")
                  if ln.lower().startswith(b"content-length:"))
    while len(rest) < length:
        rest += sk.recv(65536)
    return head + b"\r\n\r\n" + rest


def closed_by_server(sk: socket.socket, deadline_s: float = 5.0) -> bool:
    sk.settimeout(deadline_s)
    try:
        while sk.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


class Sender:
    """Sends `n` body bytes in the background and counts what the kernel took before the
    server closed the connection (a blocked send ends at the socket timeout)."""

    def __init__(self, sk: socket.socket, n: int) -> None:
        self.sk, self.n, self.sent = sk, n, 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        block = b"x" * 65536
        try:
            while self.sent < self.n:
                self.sent += self.sk.send(block[:self.n - self.sent])
        except OSError:
            pass


@pytest.fixture(scope="module")
def capped(stack_factory: Any) -> Any:
    return stack_factory(GatewayConfig(http=HttpConfig(max_body_bytes=1 << 20)))


@pytest.mark.parametrize(("method", "path", "status"), [
    ("POST", "/v1/nope", 404), ("PUT", "/v1/chat/completions", 405)])
def test_long_declared_body_is_answered_at_once_and_not_read(capped: Any, method: str,
                                                             path: str, status: int) -> None:
    sk = socket.create_connection(("127.0.0.1", capped.port), timeout=10)
    sk.sendall(make_head(method, path, {"content-length": str(BIG)}))
    sender = Sender(sk, BIG)
    t0 = time.monotonic()
    resp = read_response(sk)
    assert resp.startswith(b"HTTP/1.1 %d" % status), resp[:200]
    assert b"connection: close" in resp.lower() and b'"error"' in resp
    assert time.monotonic() - t0 < 2.0
    assert closed_by_server(sk)
    sender.thread.join(10)
    assert not sender.thread.is_alive()
    assert sender.sent < BIG  # the server stopped reading; the rest was never taken
    sk.close()


def test_long_chunked_body_is_cut_at_the_drain_limit(capped: Any) -> None:
    sk = socket.create_connection(("127.0.0.1", capped.port), timeout=10)
    sk.sendall(make_head("POST", "/v1/nope", {"transfer-encoding": "chunked"}))
    chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"  # 64 KiB chunks, 2 MiB in all
    sender = threading.Thread(target=lambda: _send_quietly(sk, chunk * 32), daemon=True)
    sender.start()
    resp = read_response(sk)
    assert resp.startswith(b"HTTP/1.1 404") and b"connection: close" in resp.lower()
    assert closed_by_server(sk)
    sender.join(10)
    sk.close()


def _send_quietly(sk: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sk.sendall(data)


def test_expect_continue_to_unknown_route_is_answered_without_100(capped: Any) -> None:
    with socket.create_connection(("127.0.0.1", capped.port), timeout=10) as sk:
        sk.sendall(make_head("POST", "/v1/nope", {"content-length": "10",
                                                  "expect": "100-continue"}))
        resp = read_response(sk)
        assert resp.startswith(b"HTTP/1.1 404"), resp[:100]  # never "100 Continue"
        assert closed_by_server(sk)


def test_short_body_is_drained_and_the_connection_kept(capped: Any) -> None:
    body = b'{"x": "' + b"y" * 60_000 + b'"}'
    with socket.create_connection(("127.0.0.1", capped.port), timeout=10) as sk:
        for path in ("/v1/nope", "/v1/other"):
            sk.sendall(make_head("POST", path, {"content-length": str(len(body))}) + body)
            resp = read_response(sk)
            assert resp.startswith(b"HTTP/1.1 404") and b"connection: close" not in resp
        sk.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        assert read_response(sk).startswith(b"HTTP/1.1 200")  # same connection


def test_known_route_over_the_cap_is_413(capped: Any) -> None:
    with socket.create_connection(("127.0.0.1", capped.port), timeout=10) as sk:
        sk.sendall(make_head("POST", "/v1/completions", {"content-length": str(BIG)}))
        resp = read_response(sk)
        assert resp.startswith(b"HTTP/1.1 413") and b"request_too_large" in resp
        assert closed_by_server(sk)
