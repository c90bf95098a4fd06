"""Bad input across the API: each gets an OpenAI-shaped error naming the param, and the same
keep-alive connection keeps serving afterwards."""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any

import pytest

from meshd.coordinator.gateway.config import GatewayConfig, HttpConfig

CHAT, COMP = "/v1/chat/completions", "/v1/completions"
M = [{"role": "user", "content": "hi"}]


def chat(**kw: Any) -> bytes:
    return json.dumps({"model": "m", "messages": M, **kw}).encode()


# (method, path, body, content-type, expected status, expected param)
CASES = [
    ("POST", CHAT, b"{not json", "application/json", 400, None),
    ("POST", CHAT, b"[1, 2]", "application/json", 400, None),
    ("POST", CHAT, b"", "application/json", 400, None),
    ("POST", CHAT, chat(), "text/plain", 415, None),
    ("POST", CHAT, json.dumps({"messages": M}).encode(), "application/json", 400, "model"),
    ("POST", CHAT, chat(messages=[]), "application/json", 400, "messages"),
    ("POST", CHAT, chat(messages="hi"), "application/json", 400, "messages"),
    ("POST", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), "application/json",
     400, "messages[0].role"),
    ("POST", CHAT, chat(messages=[{"role": "user", "content": 5}]), "application/json", 400,
     "messages[0].content"),
    ("POST", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
     "application/json", 400, "messages[0].content[0]"),
    ("POST", CHAT, chat(temperature=2.5), "application/json", 400, "temperature"),
    ("POST", CHAT, chat(temperature="hot"), "application/json", 400, "temperature"),
    ("POST", CHAT, chat(top_p=0), "application/json", 400, "top_p"),
    ("POST", CHAT, chat(max_tokens=10**12), "application/json", 400, "max_tokens"),
    ("POST", CHAT, chat(max_tokens=0), "application/json", 400, "max_tokens"),
    ("POST", CHAT, chat(max_completion_tokens=-1), "application/json", 400,
     "max_completion_tokens"),
    ("POST", CHAT, chat(n=True), "application/json", 400, "n"),
    ("POST", CHAT, chat(stop=["a", "b", "c", "d", "e"]), "application/json", 400, "stop"),
    ("POST", CHAT, chat(stop=[1]), "application/json", 400, "stop"),
    ("POST", CHAT, chat(stream="yes"), "application/json", 400, "stream"),
    ("POST", CHAT, chat(stream_options={"include_usage": True}), "application/json", 400,
     "stream_options"),
    ("POST", CHAT, chat(top_logprobs=3), "application/json", 400, "top_logprobs"),
    ("POST", CHAT, chat(logprobs=True, top_logprobs=21), "application/json", 400,
     "top_logprobs"),
    ("POST", CHAT, chat(seed=1.5), "application/json", 400, "seed"),
    ("POST", CHAT, chat(tools={"x": 1}), "application/json", 400, "tools"),
    ("POST", COMP, json.dumps({"model": "m"}).encode(), "application/json", 400, "prompt"),
    ("POST", COMP, json.dumps({"model": "m", "prompt": ["a", "b"]}).encode(),
     "application/json", 400, "prompt"),
    ("POST", COMP, json.dumps({"model": "m", "prompt": [1, -2]}).encode(), "application/json",
     400, "prompt"),
    ("POST", COMP, json.dumps({"model": "m", "prompt": "x", "logprobs": 21}).encode(),
     "application/json", 400, "logprobs"),
    ("POST", CHAT, chat(stop=["a", ""]), "application/json", 400, "stop"),
    ("POST", CHAT, chat(seed=2**63), "application/json", 400, "seed"),
    ("POST", CHAT, chat(presence_penalty=2.5), "application/json", 400, "presence_penalty"),
    ("POST", CHAT, chat(top_k=-2), "application/json", 400, "top_k"),
    # bodies that once made a worker answer 500: each is a clear 400 at the gateway
    ("POST", CHAT, b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "application/json", 400, None),
    ("POST", COMP, b'{"model": "m", "prompt": "\\udc00x"}', "application/json", 400, None),
    ("POST", COMP, b"[" * 10_000 + b"]" * 10_000, "application/json", 400, None),
    ("POST", COMP, b'{"model": "m", "prompt": "x", "max_tokens": 1e400}', "application/json",
     400, None),
    ("POST", COMP, b'{"model": "m", "prompt": "x", "max_tokens": ' + b"9" * 400 + b"}",
     "application/json", 400, None),
    ("POST", COMP, b'{"model": "m", "prompt": "x", "max_tokens": ' + b"9" * 300 + b"}",
     "application/json", 400, "max_tokens"),
    ("POST", COMP, b'{"model": "m", "prompt": "x", "temperature": NaN}', "application/json",
     400, None),
    ("POST", COMP, b'{"model": "m", "prompt": "\xff"}', "application/json", 400, None),
    ("GET", "/v1/nope", b"", None, 404, None),
    ("GET", CHAT, b"", None, 405, None),
    ("POST", "/health", b"{}", "application/json", 405, None),
]


@pytest.mark.parametrize(("method", "path", "body", "ctype", "status", "param"), CASES)
def test_bad_input(stack: Any, method: str, path: str, body: bytes, ctype: str | None,
                   status: int, param: str | None) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=5)
    conn.request(method, path, body=body or None,
                 headers={"content-type": ctype} if ctype else {})
    r = conn.getresponse()
    err = json.loads(r.read())["error"]
    assert r.status == status, err
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    conn.request("GET", "/health")  # same connection still serves
    assert conn.getresponse().status == 200
    conn.close()


def test_oversized_body_413(stack_factory: Any) -> None:
    s = stack_factory(GatewayConfig(http=HttpConfig(max_body_bytes=1024)))
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
    conn.request("POST", CHAT, body=chat(user="x" * 5000),
                 headers={"content-type": "application/json"})
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "request_too_large"
    conn.close()
    with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sk:  # chunked too
        sk.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                   b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                   + b"800\r\n" + b"x" * 2048 + b"\r\n")
        assert sk.recv(65536).startswith(b"HTTP/1.1 413")
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
    conn.request("POST", CHAT, body=chat(), headers={"content-type": "application/json"})
    assert conn.getresponse().status == 200  # still serving


def test_malformed_http_and_pipelining(stack: Any) -> None:
    body = chat()
    one = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
           b"\r\ncontent-length: %d\r\nx-request-id: r%%d\r\n\r\n%b" % (len(body), body))
    with socket.create_connection(("127.0.0.1", stack.port), timeout=5) as sk:
        sk.sendall(b"".join(one % i for i in range(3)) + b"GET /health HTTP/1.1\r\n\r\n")
        data = b""
        while data.count(b"HTTP/1.1 200") < 4:
            data += sk.recv(65536)
        ids = [ln for ln in data.split(b"\r\n") if ln.startswith(b"x-request-id")]
        assert ids[:3] == [b"x-request-id: r0", b"x-request-id: r1", b"x-request-id: r2"]
    with socket.create_connection(("127.0.0.1", stack.port), timeout=5) as sk:
        sk.sendall(b"GARBAGE\x00\r\n\r\n")
        assert sk.recv(65536).startswith(b"HTTP/1.1 400")
        assert sk.recv(100) == b""  # closed


def test_header_timeout_408(stack_factory: Any) -> None:
    s = stack_factory(GatewayConfig(http=HttpConfig(header_timeout_s=0.3, sweep_interval_s=0.05)))
    with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sk:
        t0 = time.monotonic()
        sk.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        assert sk.recv(65536).startswith(b"HTTP/1.1 408")
        assert 0.25 < time.monotonic() - t0 < 2


def test_rate_limit_helpers() -> None:
    from meshd.coordinator.gateway.http import errors

    assert errors.rate_limited().status == 429
    assert errors.unavailable().status == 503
    assert errors.gateway_timeout().to_dict()["error"]["code"] == "timeout"
