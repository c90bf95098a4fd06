"""One keep-alive HTTP/1.1 connection to a worker (an asyncio Protocol around httptools).

Internal to `backend.py`. A connection carries one request at a time. The owner sets `waiter`
(a future) and `await`s it; the protocol resolves it when there is something to look at:
headers parsed, SSE events queued, message complete, error or close. The owner then reads the
public fields. Nothing here awaits; all waiting and deadlines belong to the pool.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast

import httptools

from meshd.coordinator.gateway.http.sse import SseDecoder

_MAX_QUEUED_EVENTS = 128  # pause reading from the worker above this (consumer is slow)


class BackendError(Exception):
    """Base of every failure talking to a worker. `backend` is its ``host:port``."""

    def __init__(self, message: str, backend: str = "") -> None:
        super().__init__(f"{backend}: {message}" if backend else message)
        self.backend = backend


class BackendConnectError(BackendError):
    """The TCP connection could not be made (refused, unreachable, connect deadline)."""


class BackendTimeout(BackendError):
    """A read deadline (or the wait for a free pooled connection) passed."""


class BackendProtocolError(BackendError):
    """Malformed HTTP from the worker, or the connection closed before the response ended."""


class BackendHTTPError(BackendError):
    """The worker answered with status >= 400. `body` is its raw error body."""

    def __init__(self, status: int, body: bytes, backend: str = "") -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}", backend)
        self.status = status
        self.body = body


class Conn(asyncio.Protocol):
    """Protocol state for one connection. Reset with `begin()` before each request."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.error: BackendError | None = None
        self.paused = False
        self.begin(False)

    def begin(self, streaming: bool) -> None:
        """Prepare for a new exchange; `streaming` decodes the body as SSE events."""
        self.status = 0
        self.headers_done = False
        self.complete = False
        self.got_bytes = False
        self.keep_alive = True
        self.streaming = streaming
        self.body: list[bytes] = []
        self._raw: list[bytes] = []  # SSE body bytes of the current read, decoded after it
        self.events: deque[bytes] = deque()
        self.decoder = SseDecoder() if streaming else None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.error = BackendProtocolError(f"bad HTTP from worker: {e}")
            self.abort()
        if self._raw:  # one SSE decode per read, not per HTTP chunk (one chunk per event)
            raw, self._raw = self._raw, []
            assert self.decoder is not None
            evs = self.decoder.feed(raw[0] if len(raw) == 1 else b"".join(raw))
            if evs:
                self.events.extend(evs)
                if len(self.events) > _MAX_QUEUED_EVENTS and not self.paused:
                    self.paused = True
                    assert self.transport is not None
                    self.transport.pause_reading()
                self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete and self.error is None:
            self.error = BackendProtocolError("worker closed the connection mid-response")
        self._wake()

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True
        if self.status >= 300:
            self.decoder = None  # an error body is buffered whole, not parsed as events
        if self.streaming:
            self._wake()

    def on_body(self, data: bytes) -> None:
        (self.body if self.decoder is None else self._raw).append(data)

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # owner side
    def take_events(self) -> deque[bytes]:
        """Hand over the queued events (the caller owns the returned deque)."""
        evs, self.events = self.events, deque()
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()
        return evs

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self.error is None

    def abort(self) -> None:
        """Drop the connection now (the worker sees the disconnect and aborts the request)."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)
