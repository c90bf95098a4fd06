"""Async HTTP/1.1 client pool for one OpenAI-compatible worker (vLLM or the embedded engine).

`BackendPool(host, port)` keeps up to `max_connections` keep-alive connections. Calls:

- `await request(method, path, body)` -> `RawResponse` (any status; body bytes as received).
- `await post_json(path, payload)` -> `JsonResponse` (2xx, parsed) or raises `BackendHTTPError`.
- `async with pool.stream(path, payload) as events: async for data in events:` yields each SSE
  `data:` payload (bytes, JSON for OpenAI chunks) as it arrives (`next_batch()` for bursts)
  and stops at ``[DONE]`` or at the end of the body; a non-2xx answer raises
  `BackendHTTPError` from `__aenter__`.

Every wait has a deadline: `connect_timeout` for connecting (and for a free pooled connection),
`read_timeout` for a whole non-streamed response, for a stream's headers and for each gap
between events. Failures raise `BackendConnectError`, `BackendTimeout`, `BackendHTTPError` or
`BackendProtocolError`. Cancellation (or leaving the `async with` early) aborts the connection,
so the worker sees the client go away and frees the request; a connection goes back to the pool
only after a complete response.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson

from meshd import endpoints
from meshd.coordinator.gateway.http.sse import DONE
from meshd.coordinator.gateway.workers.client_conn import (
    BackendConnectError,
    BackendError,
    BackendHTTPError,
    BackendProtocolError,
    BackendTimeout,
    Conn,
)

__all__ = ["BackendConnectError", "BackendError", "BackendHTTPError", "BackendPool",
           "BackendProtocolError", "BackendTimeout", "JsonResponse", "RawResponse", "SseStream"]

Headers = Sequence[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class RawResponse:
    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class JsonResponse:
    status: int
    data: Any


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(BackendTimeout("read deadline passed"))


class BackendPool:
    """Connection pool for one worker. Use from one event loop; `close()` when done."""

    def __init__(self, host: str, port: int, *, max_connections: int = 512,
                 connect_timeout: float = 3.0, read_timeout: float = 300.0,
                 api_token: str = "") -> None:
        """`api_token`: sent as `Authorization: Bearer` on every request (the worker's token:
        meshd workers and vLLM's `--api-key` demand it)."""
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self.host, self.port, self.name = host, port, f"{host}:{port}"
        self.max_connections = max_connections
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._idle: list[Conn] = []
        self._total = 0
        self._slot_waiters: deque[asyncio.Future[Conn | None]] = deque()
        self._head = b"HTTP/1.1\r\nhost: %b\r\n" % self.name.encode()
        if api_token:  # encoded once: no per-request cost
            self._head += b"authorization: Bearer %b\r\n" % api_token.encode("ascii")
        # The loop the pool runs on, found once: `asyncio.get_running_loop()` costs a getpid()
        # syscall per call on CPython 3.11, and the pool waits several times per request.
        self._loop: asyncio.AbstractEventLoop | None = None

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> BackendPool:
        """`http://host:port` (a path part is ignored; https is not supported); ValueError
        otherwise."""
        scheme, sep, rest = url.partition("://")
        try:
            ep = endpoints.parse(scheme + sep + rest.split("/", 1)[0], ("http",))
        except ValueError as e:
            raise ValueError(f"backend url must be http://host:port: {e}") from None
        return cls(ep.host, ep.port, **kw)

    # ---- public calls
    async def request(self, method: str, path: str, body: bytes = b"", *,
                      headers: Headers = (), timeout: float | None = None) -> RawResponse:
        """One exchange; returns whatever status the worker sent."""
        msg = self._encode(method, path, body, headers, b"application/json")
        conn = await self._open(msg, False, timeout or self.read_timeout)
        self._release(conn)
        return RawResponse(conn.status, b"".join(conn.body))

    async def post_json(self, path: str, payload: bytes | Mapping[str, Any], *,
                        headers: Headers = (), timeout: float | None = None) -> JsonResponse:
        """POST JSON (bytes are sent as-is); 2xx -> parsed body, else `BackendHTTPError`."""
        body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        r = await self.request("POST", path, body, headers=headers, timeout=timeout)
        if r.status >= 300:
            raise BackendHTTPError(r.status, r.body, self.name)
        try:
            return JsonResponse(r.status, orjson.loads(r.body) if r.body else None)
        except orjson.JSONDecodeError as e:
            raise BackendProtocolError(f"worker sent invalid JSON: {e}", self.name) from None

    def stream(self, path: str, payload: bytes | Mapping[str, Any], *, headers: Headers = (),
               timeout: float | None = None) -> SseStream:
        """An SSE stream for a POST; enter it with `async with`."""
        body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        msg = self._encode("POST", path, body, headers, b"application/json")
        return SseStream(self, msg, timeout or self.read_timeout)

    async def close(self) -> None:
        """Close idle connections and fail waiters; in-flight exchanges end on their own."""
        for c in self._idle:
            c.abort()
        self._total -= len(self._idle)
        self._idle.clear()
        while self._slot_waiters:
            w = self._slot_waiters.popleft()
            if not w.done():
                w.set_exception(BackendConnectError("pool closed", self.name))

    @property
    def stats(self) -> tuple[int, int]:
        """(open connections, idle connections)."""
        return self._total, len(self._idle)

    # ---- internals
    def _encode(self, method: str, path: str, body: bytes, headers: Headers,
                ctype: bytes) -> bytes:
        extra = b"".join(b"%b: %b\r\n" % (k.encode(), v.encode()) for k, v in headers)
        return b"%b %b %bcontent-type: %b\r\ncontent-length: %d\r\n%b\r\n%b" % (
            method.encode(), path.encode(), self._head, ctype, len(body), extra, body)

    async def _open(self, msg: bytes, streaming: bool, timeout: float) -> Conn:
        """Send `msg`; wait for the headers (streaming) or the whole response. On failure the
        connection is released (aborted) before raising. Retries once on a fresh connection
        when a reused one closes before any response byte (the keep-alive close race)."""
        for attempt in range(2):
            conn, reused = await self._acquire()
            conn.begin(streaming)
            assert conn.transport is not None
            conn.transport.write(msg)
            try:
                while not (conn.complete or (streaming and conn.headers_done)):
                    await self._wait(conn, timeout)
                return conn
            except BackendProtocolError:
                self._release(conn)
                if reused and not conn.got_bytes and attempt == 0:
                    continue
                raise
            except BaseException:
                self._release(conn)
                raise
        raise AssertionError("unreachable")

    async def _wait(self, conn: Conn, timeout: float) -> None:
        if conn.error is not None:
            raise self._named(conn.error)
        loop = self._get_loop()
        fut = conn.waiter = loop.create_future()
        handle = loop.call_later(timeout, _expire, fut)
        try:
            await fut
        except BackendTimeout:
            conn.abort()
            raise BackendTimeout(f"no data within {timeout:g}s", self.name) from None
        finally:
            handle.cancel()
            conn.waiter = None
        if conn.error is not None and not conn.complete:
            raise self._named(conn.error)

    def _named(self, err: BackendError) -> BackendError:
        if not err.backend:
            err = type(err)(str(err), self.name)
        return err

    async def _acquire(self) -> tuple[Conn, bool]:
        while self._idle:
            c = self._idle.pop()
            if not c.closed:
                return c, True
            self._total -= 1
        if self._total >= self.max_connections:
            fut: asyncio.Future[Conn | None] = self._get_loop().create_future()
            self._slot_waiters.append(fut)
            try:
                got = await asyncio.wait_for(fut, self.connect_timeout)
            except TimeoutError:
                raise BackendTimeout("no free connection in the pool", self.name) from None
            if got is not None:
                return got, True
        else:
            self._total += 1
        try:
            return await self._connect(), False
        except BaseException:
            self._total -= 1
            self._hand_over(None)
            raise

    async def _connect(self) -> Conn:
        loop = self._get_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(Conn, self.host, self.port), self.connect_timeout)
        except TimeoutError:
            raise BackendConnectError("connect deadline passed", self.name) from None
        except OSError as e:
            raise BackendConnectError(f"connect failed: {e}", self.name) from None
        return conn

    def _release(self, conn: Conn) -> None:
        """Return `conn` to the pool if it finished cleanly, else drop it and free its slot."""
        if conn.reusable():
            if not self._hand_over(conn):
                self._idle.append(conn)
            return
        if not conn.closed:
            conn.abort()
        self._total -= 1
        if self._slot_waiters and self._total < self.max_connections:
            self._total += 1
            if not self._hand_over(None):
                self._total -= 1

    def _hand_over(self, conn: Conn | None) -> bool:
        """Give a live conn (or, with None, a slot to connect with) to the oldest waiter."""
        while self._slot_waiters:
            w = self._slot_waiters.popleft()
            if not w.done():
                w.set_result(conn)
                return True
        return False


class SseStream:
    """One streamed exchange: `async with` sends the request and checks the status, iteration
    yields event payloads, exit returns the connection to the pool or aborts it if unfinished."""

    def __init__(self, pool: BackendPool, msg: bytes, timeout: float) -> None:
        self._pool, self._msg, self._timeout = pool, msg, timeout
        self._conn: Conn | None = None
        self._events: deque[bytes] = deque()
        self.saw_done = False
        self.status = 0

    async def __aenter__(self) -> SseStream:
        pool = self._pool
        conn = await pool._open(self._msg, True, self._timeout)
        self.status = conn.status
        if conn.status >= 300:
            try:
                while not conn.complete:
                    await pool._wait(conn, self._timeout)
            finally:
                pool._release(conn)
            raise BackendHTTPError(conn.status, b"".join(conn.body), pool.name)
        self._conn = conn
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._release(conn)  # aborts unless the response completed

    def __aiter__(self) -> SseStream:
        return self

    async def __anext__(self) -> bytes:
        if not self._events:
            batch = await self.next_batch()
            if not batch:
                raise StopAsyncIteration
            self._events.extend(batch)
        return self._events.popleft()

    async def next_batch(self) -> list[bytes]:
        """Every payload that has arrived (at least one, waiting if none has); an empty list
        at the end of the stream. Cheaper than per-event iteration when events come in bursts:
        the caller can forward a burst with one write. Do not mix with `async for`."""
        conn = self._conn
        if conn is None:
            return []
        while True:
            if conn.events and not self.saw_done:
                evs = conn.take_events()
                out = list(evs)
                if DONE in out:
                    self.saw_done = True
                    del out[out.index(DONE):]
                if out:
                    return out
                continue
            if conn.complete:
                return []
            if self.saw_done:
                conn.events.clear()
            await self._pool._wait(conn, self._timeout)
