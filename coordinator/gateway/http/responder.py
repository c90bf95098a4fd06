"""`Responder`: how a handler answers one request on its client connection.

Exactly one of: `send(status, body)` (a complete response), `send_error(err)`, or
`start_stream()` -> `send_event(data)`* -> `end_stream()` (HTTP chunked SSE). Header bytes are
pre-built; a response is one `transport.write`, an event one more. `send_event` waits (up to
the connection's write deadline) while the client's socket buffer is full, so a slow reader
slows the worker stream instead of growing memory. After the client is gone every call is a
no-op and `disconnected` is true; the handler task is being cancelled anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus
from typing import Protocol

import orjson

from meshd.coordinator.gateway.http.errors import ApiError
from meshd.coordinator.gateway.http.sse import LAST_CHUNK, chunk_frame, done_frame, error_event

JSON = b"application/json"
_STATUS = {s.value: b"HTTP/1.1 %d %b\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
_STREAM_HEAD = (b"content-type: text/event-stream\r\ncache-control: no-cache\r\n"
                b"transfer-encoding: chunked\r\n")
NOT_STARTED, STREAMING, DONE = 0, 1, 2


class Sink(Protocol):
    """The connection side a Responder writes to (implemented by the server connection)."""

    closed: bool
    write_paused: bool

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def response_done(self, status: int, keep_alive: bool) -> None: ...


def status_line(status: int) -> bytes:
    line = _STATUS.get(status)
    return line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % status


Headers = Sequence[tuple[str, str]] | bytes  # (name, value) pairs, or header lines encoded


def encode_headers(headers: Headers) -> bytes:
    if isinstance(headers, bytes):
        return headers
    return b"".join(b"%b: %b\r\n" % (k.encode("latin-1"), v.encode("latin-1"))
                    for k, v in headers)


class Responder:
    """Answers one request. `request_id` is echoed as X-Request-Id on every response."""

    __slots__ = ("_conn", "_rid_line", "anthropic", "keep_alive", "named", "request_id",
                 "state", "status")

    def __init__(self, conn: Sink, request_id: str, keep_alive: bool) -> None:
        self._conn = conn
        self.anthropic = False  # errors in Anthropic's shape (the /v1/messages route)
        self.named = False  # a stream of named events (Messages, Responses): no [DONE]
        self.request_id = request_id
        self._rid_line = b"x-request-id: %b\r\n" % request_id.encode()
        self.keep_alive = keep_alive
        self.state = NOT_STARTED
        self.status = 0

    @property
    def started(self) -> bool:
        return self.state != NOT_STARTED

    @property
    def finished(self) -> bool:
        return self.state == DONE

    @property
    def disconnected(self) -> bool:
        return self._conn.closed

    def _head(self, status: int, extra: bytes) -> bytes:
        conn_line = b"" if self.keep_alive else b"connection: close\r\n"
        return status_line(status) + extra + self._rid_line + conn_line + b"\r\n"

    def send(self, status: int, body: bytes, content_type: bytes = JSON,
             headers: Headers = ()) -> None:
        """A complete response; `body` is sent as-is (the caller owns its encoding)."""
        if self.state != NOT_STARTED:
            raise RuntimeError("response already started")
        self.state, self.status = DONE, status
        extra = b"content-type: %b\r\ncontent-length: %d\r\n" % (content_type, len(body))
        if headers:
            extra += encode_headers(headers)
        self._conn.write(self._head(status, extra) + body)
        self._conn.response_done(status, self.keep_alive)

    def send_error(self, err: ApiError) -> None:
        """The OpenAI error body with `err.status` (and Retry-After when set)."""
        hdrs = err.headers if err.retry_after is None else (
            ("retry-after", f"{err.retry_after:g}"), *err.headers)
        if self.anthropic:
            from meshd.coordinator.gateway.dialects.anthropic_out import anthropic_error_body

            body = orjson.dumps(anthropic_error_body(err.status, err.message))
        else:
            body = err.body()
        self.send(err.status, body, JSON, hdrs)

    async def start_stream(self, status: int = 200, headers: Headers = ()) -> None:
        """Send the headers of an SSE response."""
        if self.state != NOT_STARTED:
            raise RuntimeError("response already started")
        self.state, self.status = STREAMING, status
        extra = _STREAM_HEAD + encode_headers(headers) if headers else _STREAM_HEAD
        self._conn.write(self._head(status, extra))

    async def send_event(self, data: bytes) -> None:
        """One ``data: <data>`` event (`data` is JSON bytes without newlines)."""
        conn = self._conn
        if conn.write_paused:
            await conn.drain()
        if self.state == STREAMING:
            conn.write(chunk_frame(data))

    async def send_events(self, batch: list[bytes]) -> None:
        """Several events in one write (a burst that arrived together)."""
        conn = self._conn
        if conn.write_paused:
            await conn.drain()
        if self.state == STREAMING:
            conn.write(b"".join([chunk_frame(d) for d in batch]))

    async def send_sse(self, events: list[bytes]) -> None:
        """Whole SSE events (`event:` and `data:` lines, encoded by the caller) in one write."""
        conn = self._conn
        if conn.write_paused:
            await conn.drain()
        if self.state == STREAMING and events:
            conn.write(b"".join([b"%x\r\n%b\r\n" % (len(e), e) for e in events]))

    async def end_stream(self, done: bool = True) -> None:
        """``data: [DONE]`` (unless `done` is false) and the end of the chunked body."""
        if self.state != STREAMING:
            raise RuntimeError("no stream to end")
        self.state = DONE
        self._conn.write(done_frame() + LAST_CHUNK if done else LAST_CHUNK)
        self._conn.response_done(self.status, self.keep_alive)

    def abort_stream(self, err: ApiError) -> None:
        """End a started stream with an in-stream error event and ``[DONE]`` (used by the
        server when the handler fails after the 200 went out)."""
        if self.state != STREAMING:
            return
        self.state = DONE
        if self.anthropic:
            from meshd.coordinator.gateway.dialects.anthropic_out import anthropic_error_body

            ev = b"event: error\ndata: %b\n\n" % orjson.dumps(
                anthropic_error_body(err.status, err.message))
            self._conn.write(b"%x\r\n%b\r\n" % (len(ev), ev) + LAST_CHUNK)
        elif self.named:  # the Responses API's error event
            ev = b"event: error\ndata: %b\n\n" % orjson.dumps(
                {"type": "error", "code": err.code or err.err_type, "message": err.message,
                 "param": err.param, "sequence_number": 0})
            self._conn.write(b"%x\r\n%b\r\n" % (len(ev), ev) + LAST_CHUNK)
        else:
            frame = chunk_frame(error_event(err.message, err.err_type, err.code))
            self._conn.write(frame + done_frame() + LAST_CHUNK)
        self._conn.response_done(self.status, self.keep_alive)
