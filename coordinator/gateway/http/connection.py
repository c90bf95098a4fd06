"""One client connection: HTTP/1.1 parsing (httptools), pipelining, flow control, deadlines.

Requests on a connection are answered strictly in order: parsed requests wait in `queue`, at
most one handler task runs at a time, and reading pauses when more than `max_pipelined` wait.
A request the server can answer at once (errors, GET routes) is answered without a task.
Deadlines are fields (`read_deadline`, `idle_deadline`, `task_started`) that the server's
sweeper checks every `sweep_interval`, so the hot path sets no timers. When the client goes
away (EOF or reset), `connection_lost` cancels the running handler task: that is how a client
disconnect reaches the request lifecycle and, through it, the workers.

A request answered with an error whatever its body says (unknown route, method not allowed)
has its body read and dropped only up to `_DRAIN_BYTES` (never past `max_body_bytes`), so the
connection can serve the next request; a longer body (declared, chunked, or `Expect:
100-continue`) is not read: the error goes out at once and the connection closes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

import httptools

from meshd.coordinator.gateway.http.errors import ApiError, invalid, too_large
from meshd.coordinator.gateway.http.responder import Responder
from meshd.coordinator.gateway.http.routes import ROUTES, Route, route_of_item

if TYPE_CHECKING:
    from meshd.coordinator.gateway.http.server import GatewayServer

_HDR = {b"content-type": 0, b"authorization": 1, b"x-request-id": 2, b"expect": 3,
        b"content-length": 4, b"x-meshd-privacy": 5, b"x-meshd-halt-below": 6,
        b"x-meshd-receipt": 7, b"traceparent": 8, b"x-api-key": 9}
_NHDR = 10
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_DRAIN_BYTES = 64 << 10  # the most of a refused request's body read to keep the connection


class Pending:
    """A fully read request waiting for its turn. `error` set: answer it and do nothing else."""

    __slots__ = (
        "api_key",
        "auth",
        "body",
        "close_after",
        "ctype",
        "error",
        "halt_below",
        "keep_alive",
        "method",
        "path",
        "privacy",
        "receipt",
        "rid",
        "route",
        "traceparent",
    )

    def __init__(self, route: Route | None, method: bytes, path: bytes, body: bytes,
                 hdrs: list[bytes | None], keep_alive: bool, error: ApiError | None,
                 close_after: bool = False) -> None:
        self.route, self.method, self.path, self.body = route, method, path, body
        self.ctype, self.auth, self.rid, self.privacy = hdrs[0], hdrs[1], hdrs[2], hdrs[5]
        self.halt_below, self.receipt, self.traceparent = hdrs[6], hdrs[7], hdrs[8]
        self.api_key = hdrs[9]  # Anthropic's clients authenticate with x-api-key
        self.keep_alive, self.error, self.close_after = keep_alive, error, close_after


class _Fatal(Exception):
    pass


class HttpConnection(asyncio.Protocol):
    def __init__(self, srv: GatewayServer) -> None:
        self.srv = srv
        self.cfg = srv.config.http
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.broken = False  # stop parsing: a fatal error is queued, close after answering it
        self.close_when_idle = False
        self.write_paused = False
        self.read_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.queue: deque[Pending] = deque()
        self.task: asyncio.Task[None] | None = None
        self.responder: Responder | None = None
        self.task_started = 0.0
        self.timed_out = False
        self.read_deadline = 0.0  # 0: not reading a request
        self.idle_deadline = srv.now + self.cfg.keepalive_timeout_s
        self._begin()

    def _begin(self) -> None:
        self.url = b""
        self.hdrs: list[bytes | None] = [None] * _NHDR
        self.body: list[bytes] = []
        self.body_size = 0
        self.head_size = 0
        self.err: ApiError | None = None
        self.route: Route | None = None

    # ---- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.srv.conns.add(self)
        self.srv.stats.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.srv.conns.discard(self)
        self.srv.stats.connections -= 1
        self.queue.clear()
        r, t = self.responder, self.task
        if t is not None and not t.done() and (r is None or not r.finished):
            self.srv.stats.disconnects += 1
            t.cancel()
        self._wake_drain()

    def data_received(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fatal(invalid("Protocol upgrades are not supported."))
        except httptools.HttpParserError:
            if not self.broken:
                self.fatal(invalid("Malformed HTTP request."))
        if self.queue and self.task is None:
            self.pump()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain()

    # ---- httptools callbacks
    def on_message_begin(self) -> None:
        self._begin()
        self.read_deadline = self.srv.now + self.cfg.header_timeout_s

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        i = _HDR.get(name.lower())
        if i is not None:
            self.hdrs[i] = value
        self._count_head(len(name) + len(value) + 4)

    def on_headers_complete(self) -> None:
        cfg = self.cfg
        self.read_deadline = self.srv.now + cfg.body_timeout_s
        url = self.url
        path = url.split(b"?", 1)[0] if b"?" in url else url
        methods = ROUTES.get(path) or route_of_item(path)
        if methods is None:
            self._refuse(self.srv.not_found(path))
            return
        route = methods.get(self.parser.get_method())
        if route is None:
            self._refuse(self.srv.method_not_allowed(self.parser.get_method(), path))
            return
        self.route = route
        cl = self.hdrs[4]  # llhttp has checked it is a number
        if cl is not None and int(cl) > cfg.max_body_bytes:
            self.fatal(too_large(cfg.max_body_bytes))
            raise _Fatal
        if self.hdrs[3] is not None and self.hdrs[3].lower() == b"100-continue":
            self.write(_CONTINUE)

    def _refuse(self, err: ApiError) -> None:
        """Answer `err` for this request; read its body only if it is short (see above)."""
        self.err = err
        expect, length = self.hdrs[3], self.hdrs[4]
        if (expect is not None and expect.lower() == b"100-continue") or (
                length is not None and int(length) > self._drain_limit()):
            self.fatal(err)
            raise _Fatal

    def _drain_limit(self) -> int:
        return min(_DRAIN_BYTES, self.cfg.max_body_bytes)

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.err is not None:
            if self.body_size > self._drain_limit():  # chunked: too long to drain
                self.fatal(self.err)
                raise _Fatal
            return
        if self.body_size > self.cfg.max_body_bytes:
            self.fatal(too_large(self.cfg.max_body_bytes))
            raise _Fatal
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.broken:
            return
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.queue.append(Pending(self.route, self.parser.get_method(), self.url, body,
                                  self.hdrs, self.parser.should_keep_alive(), self.err))
        self.read_deadline = 0.0
        if len(self.queue) > self.cfg.max_pipelined and not self.read_paused:
            self.read_paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def _count_head(self, n: int) -> None:
        self.head_size += n
        if self.head_size > self.cfg.max_header_bytes:
            self.fatal(ApiError(431, "Request headers too large.",
                                code="request_header_fields_too_large"))
            raise _Fatal

    # ---- answering
    def fatal(self, err: ApiError) -> None:
        """Stop reading; answer `err` after what is queued, then close."""
        if self.broken:
            return
        self.broken = True
        self.read_deadline = 0.0
        if self.transport is not None and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
        self.queue.append(Pending(None, b"", b"", b"", [None] * _NHDR, False, err, True))

    def pump(self) -> None:
        """Answer queued requests in order until one needs a handler task (or none are left)."""
        srv = self.srv
        while self.queue and self.task is None and not self.closed:
            srv.dispatch(self, self.queue.popleft())
        if not self.queue and self.read_paused and not self.broken and not self.closed:
            self.read_paused = False
            assert self.transport is not None
            self.transport.resume_reading()

    def start_task(self, coro: Coroutine[Any, Any, None], responder: Responder) -> None:
        """Run a handler coroutine for `responder`'s request; the pipeline waits for it."""
        self.responder = responder
        self.task_started = self.srv.now
        self.task = self.srv.loop.create_task(self.srv.run_handler(self, coro))

    def task_finished(self) -> None:
        self.task = None
        self.responder = None
        if self.closed:
            return
        if self.queue:
            self.pump()
        if self.task is None and not self.queue:
            self.idle_deadline = self.srv.now + self.cfg.keepalive_timeout_s
            if self.close_when_idle:
                self.close()

    def write(self, data: bytes) -> None:
        if not self.closed:
            assert self.transport is not None
            self.transport.write(data)

    def response_done(self, status: int, keep_alive: bool) -> None:
        self.srv.stats.responses[status] += 1
        if not keep_alive:
            self.close()
        else:
            self.idle_deadline = self.srv.now + self.cfg.keepalive_timeout_s

    def close(self) -> None:
        """Close after the buffered writes are flushed (a graceful end of the connection)."""
        if self.transport is not None and not self.closed:
            self.queue.clear()
            self.broken = True
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def drain(self) -> None:
        """Wait until the client's socket accepts writes again, up to `write_timeout`; past it
        the connection is aborted (the handler is then cancelled as for a disconnect)."""
        if not self.write_paused or self.closed:
            return
        fut = self._drain_waiter = self.srv.loop.create_future()
        try:
            await asyncio.wait_for(fut, self.cfg.write_timeout_s)
        except TimeoutError:
            self.abort()
        finally:
            self._drain_waiter = None

    def _wake_drain(self) -> None:
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def is_idle(self) -> bool:
        return self.task is None and not self.queue and self.read_deadline == 0.0
