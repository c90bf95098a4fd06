"""A fast fake OpenAI-compatible worker (uvloop + httptools) for gateway tests and benchmarks.

`python benchmarks/fake_backend.py --port 9000 [--chunks 8] [--capacity 0]` serves:
- POST /v1/chat/completions, /v1/completions: a fixed small JSON completion, or with
  `"stream": true` an SSE stream of `--chunks` token chunks (+ a usage chunk when
  `stream_options.include_usage`) and `data: [DONE]`.
- GET /v1/models, GET /health, GET /fake/stats (counters as JSON).
With `return_token_ids` (vLLM's extension, what the mesh path asks for) each stream chunk also
carries the token ids of its text (`t<i> ` -> three ids); a completions request with an int
`logprobs` (k) gets completions-form logprobs with k alternatives per token; with `--scores`
a request with `meshd_confidence` gets one score per token (as meshd's engine answers).
Test knobs, read from the request body (unknown fields that a gateway passes through):
`fake_delay` (seconds between stream chunks), `fake_chunks` (override), `fake_status` (answer
that HTTP status with an OpenAI error body). `FakeBackend.stats["aborted"]` counts streams whose
client connection closed before the stream ended: that is how tests see a cancellation arrive.
`FakeBackend(capacity=K)` is a saturated worker: at most K streams produce chunks at once, the
rest wait FIFO before their first chunk (`queued` now, `stats["queued_peak"]` at most).
"""

from __future__ import annotations

import argparse
import asyncio
from collections import deque
from typing import Any, cast

import httptools
import orjson

_OK = b"HTTP/1.1 200 OK\r\n"
_JSON_HEAD = b"content-type: application/json\r\ncontent-length: %d\r\n%b\r\n"
_SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
             b"transfer-encoding: chunked\r\n%b\r\n")


def _frame(payload: bytes) -> bytes:
    ev = b"data: " + payload + b"\n\n"
    return b"%x\r\n%b\r\n" % (len(ev), ev)


def _logprobs(token_ids: list[int], k: int) -> dict[str, Any]:
    """Completions-form logprobs of `token_ids` with `k` alternatives each, tokens named
    `token_id:<id>` (vLLM's `return_tokens_as_token_ids`): a confident, varied distribution."""
    names = [f"token_id:{t}" for t in token_ids]
    tops = [{name: -0.2, **{f"token_id:{(t + j) % 256}": -2.0 - j for j in range(1, k)}}
            for name, t in zip(names, token_ids, strict=True)]
    return {"tokens": names, "token_logprobs": [-0.2] * len(names), "top_logprobs": tops,
            "text_offset": list(range(len(names)))}


def _completion(chat: bool, model: str, rid: str, ids: bool = False, k: int = 0,
                conf: bool = False) -> bytes:
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    if chat:
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None,
                                  "message": {"role": "assistant", "content": "hello there !"}}
    else:
        choice = {"index": 0, "finish_reason": "stop",
                  "logprobs": _logprobs([104, 101, 108], k) if k else None,
                  "text": "hello there !"}
    if ids:
        choice["token_ids"] = [104, 101, 108]
    if conf:  # meshd's extension: the worker's own score of each token
        choice["meshd_confidence"] = [0.9, 0.8, 0.85]
    return orjson.dumps({"id": rid, "object": "chat.completion" if chat else "text_completion",
                         "created": 1700000000, "model": model, "choices": [choice],
                         "usage": usage})


def _chunk(chat: bool, model: str, rid: str, i: int, last: bool, ids: bool = False,
           k: int = 0, conf: bool = False) -> bytes:
    token_ids = [116, 48 + i % 10, 32]
    if chat:
        choice: dict[str, Any] = {"index": 0, "delta": {"content": f"t{i} "},
                                  "finish_reason": "stop" if last else None}
    else:
        choice = {"index": 0, "text": f"t{i} ", "finish_reason": "stop" if last else None}
        if k:  # completions-form logprobs, asked for with an int `logprobs`
            choice["logprobs"] = _logprobs(token_ids, k)
    if ids:  # vLLM's `return_token_ids`: the ids behind this chunk's text
        choice["token_ids"] = token_ids
    if conf:  # meshd's `meshd_confidence`: one score per token
        choice["meshd_confidence"] = [0.9, 0.8, 0.85]
    return orjson.dumps({"id": rid, "object": "chat.completion.chunk" if chat
                         else "text_completion", "created": 1700000000, "model": model,
                         "choices": [choice]})


class FakeBackend:
    """Server state shared by all connections (counters readable from other threads)."""

    def __init__(self, chunks: int = 8, token_ids: bool = True, capacity: int = 0,
                 scores: bool = False) -> None:
        """`token_ids=False`: a worker that ignores `return_token_ids` (older vLLM).
        `capacity`: streams served at once (0: unlimited); the rest queue FIFO.
        `scores`: it answers `meshd_confidence` (as meshd's engine does; vLLM does not)."""
        if capacity < 0:
            raise ValueError(f"capacity: must be >= 0, got {capacity}")
        self.chunks = chunks
        self.token_ids = token_ids
        self.scores = scores
        self.capacity = capacity
        self.queued = 0  # streams waiting for a slot now
        self._slots: asyncio.Semaphore | None = None  # made on the serving loop
        self.stats: dict[str, int] = {"requests": 0, "streams": 0, "aborted": 0,
                                      "completed_streams": 0, "queued_peak": 0}
        self.last_body: dict[str, Any] = {}
        self.recent: deque[dict[str, Any]] = deque(maxlen=8)  # the last bodies, oldest first
        self.last_request_id = b""
        self._cache: dict[tuple[bool, str, bool, int, bool], bytes] = {}
        self.server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Conn(self), host, port, backlog=2048)
        return int(self.server.sockets[0].getsockname()[1])

    def body_for(self, chat: bool, model: str, ids: bool = False, k: int = 0,
                 conf: bool = False) -> bytes:
        key = (chat, model, ids, k, conf)
        b = self._cache.get(key)
        if b is None:
            b = self._cache[key] = _completion(chat, model, "cmpl-fake", ids, k, conf)
        return b


class _Conn(asyncio.Protocol):
    def __init__(self, be: FakeBackend) -> None:
        self.be = be
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.rid = b""
        self.streaming = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.streaming:
            self.be.stats["aborted"] += 1

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.body, self.rid = b"", [], b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-request-id":
            self.rid = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        be, t = self.be, self.transport
        assert t is not None
        be.stats["requests"] += 1
        be.last_request_id = self.rid
        conn = b"" if self.parser.should_keep_alive() else b"connection: close\r\n"
        if self.parser.get_method() == b"GET":
            body = orjson.dumps(be.stats) if self.url == b"/fake/stats" else orjson.dumps(
                {"object": "list", "data": [{"id": "fake", "object": "model"}]})
            t.write(_OK + _JSON_HEAD % (len(body), conn) + body)
            return
        req = orjson.loads(b"".join(self.body))
        be.last_body = req
        be.recent.append(req)
        chat = self.url.startswith(b"/v1/chat")
        model = str(req.get("model", "fake"))
        status = req.get("fake_status")
        if status:
            err = orjson.dumps({"error": {"message": "fake failure", "type": "server_error",
                                          "param": None, "code": None}})
            t.write(b"HTTP/1.1 %d Err\r\n" % status + _JSON_HEAD % (len(err), conn) + err)
        elif req.get("stream"):
            stream = (self._limited(req, chat, model, conn) if be.capacity
                      else self._stream(req, chat, model, conn))
            asyncio.get_running_loop().create_task(stream)
        else:
            body = be.body_for(chat, model, bool(req.get("return_token_ids")) and be.token_ids,
                               _top_k(req), be.scores and req.get("meshd_confidence") is True)
            t.write(_OK + _JSON_HEAD % (len(body), conn) + body)

    async def _limited(self, req: dict[str, Any], chat: bool, model: str, conn: bytes) -> None:
        """`_stream` once one of the backend's `capacity` slots is free (FIFO)."""
        be = self.be
        if be._slots is None:
            be._slots = asyncio.Semaphore(be.capacity)
        slots = be._slots
        self.streaming = True  # a client that leaves while queued counts as aborted
        if slots.locked():
            be.queued += 1
            be.stats["queued_peak"] = max(be.stats["queued_peak"], be.queued)
            try:
                await slots.acquire()
            finally:
                be.queued -= 1
        else:
            await slots.acquire()
        try:
            if not self.closed:
                await self._stream(req, chat, model, conn)
        finally:
            slots.release()

    async def _stream(self, req: dict[str, Any], chat: bool, model: str, conn: bytes) -> None:
        t, be = self.transport, self.be
        assert t is not None
        n = int(req.get("fake_chunks", be.chunks))
        ids = bool(req.get("return_token_ids")) and be.token_ids
        delay = float(req.get("fake_delay", 0.0))
        k = _top_k(req)
        conf = be.scores and req.get("meshd_confidence") is True
        be.stats["streams"] += 1
        self.streaming = True
        out = [_SSE_HEAD % conn]
        for i in range(n):
            out.append(_frame(_chunk(chat, model, "cmpl-fake", i, i == n - 1, ids, k, conf)))
            if delay:
                t.write(b"".join(out))
                out.clear()
                await asyncio.sleep(delay)
                if self.closed:
                    return
        if (req.get("stream_options") or {}).get("include_usage"):
            out.append(_frame(orjson.dumps({
                "id": "cmpl-fake", "object": "chat.completion.chunk", "created": 1700000000,
                "model": model, "choices": [],
                "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}})))
        out.append(_frame(b"[DONE]") + b"0\r\n\r\n")
        self.streaming = False
        be.stats["completed_streams"] += 1
        t.write(b"".join(out))


def _top_k(req: dict[str, Any]) -> int:
    """Alternatives per token a completions request asked for (`logprobs`: an int), else 0."""
    lp = req.get("logprobs")
    return lp if type(lp) is int and lp > 0 else 0


async def _main(port: int, chunks: int, capacity: int = 0, scores: bool = False) -> None:
    be = FakeBackend(chunks, capacity=capacity, scores=scores)
    actual = await be.start(port=port)
    print(f"fake backend on 127.0.0.1:{actual}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--capacity", type=int, default=0, help="streams at once (0: unlimited)")
    ap.add_argument("--scores", action="store_true",
                    help="answer meshd_confidence (a meshd engine), not only logprobs (vLLM)")
    a = ap.parse_args()
    import uvloop

    uvloop.run(_main(a.port, a.chunks, a.capacity, a.scores))
