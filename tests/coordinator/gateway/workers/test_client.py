"""BackendPool against the fake worker: JSON, SSE, typed errors, deadlines, reuse, and the
SSE decoder on awkward splits."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from meshd.coordinator.gateway.http.sse import SseDecoder, chunk_frame, encode_event
from meshd.coordinator.gateway.workers.client import (
    BackendConnectError,
    BackendHTTPError,
    BackendPool,
    BackendTimeout,
)

BODY = {"model": "m", "messages": [{"role": "user", "content": "x"}]}


def run_with_backend(fake_backend_module: Any, fn: Any) -> Any:
    async def main() -> Any:
        be = fake_backend_module.FakeBackend(chunks=3)
        port = await be.start()
        pool = BackendPool("127.0.0.1", port, max_connections=2, read_timeout=0.5)
        try:
            return await fn(pool, be)
        finally:
            await pool.close()
            be.server.close()

    return asyncio.run(main())


def test_post_json_stream_and_reuse(fake_backend_module: Any) -> None:
    async def fn(pool: BackendPool, be: Any) -> None:
        r = await pool.post_json("/v1/chat/completions", BODY)
        assert r.status == 200 and r.data["choices"][0]["message"]["content"]
        async with pool.stream("/v1/chat/completions", {**BODY, "stream": True}) as s:
            got = [d async for d in s]
        assert len(got) == 3 and s.saw_done
        rs = await asyncio.gather(*(pool.post_json("/v1/completions", {"model": "m",
                                                                        "prompt": "x"})
                                    for _ in range(10)))
        assert all(r.status == 200 for r in rs)
        assert pool.stats[0] <= 2  # bounded and reused

    run_with_backend(fake_backend_module, fn)


def test_typed_errors(fake_backend_module: Any) -> None:
    async def fn(pool: BackendPool, be: Any) -> None:
        with pytest.raises(BackendHTTPError) as ei:
            await pool.post_json("/v1/chat/completions", {**BODY, "fake_status": 429})
        assert ei.value.status == 429 and b"fake failure" in ei.value.body
        with pytest.raises(BackendHTTPError):
            async with pool.stream("/v1/chat/completions",
                                   {**BODY, "stream": True, "fake_status": 500}):
                pass
        with pytest.raises(BackendTimeout):
            async with pool.stream("/v1/chat/completions", {**BODY, "stream": True,
                                                            "fake_delay": 2}) as s:
                async for _ in s:
                    pass
        await asyncio.sleep(0.05)
        assert be.stats["aborted"] == 1  # the deadline closed the worker connection
        r = await pool.post_json("/v1/chat/completions", BODY)  # pool still works
        assert r.status == 200

    run_with_backend(fake_backend_module, fn)


def test_cancel_closes_worker_connection(fake_backend_module: Any) -> None:
    async def fn(pool: BackendPool, be: Any) -> None:
        async def consume() -> None:
            async with pool.stream("/v1/chat/completions", {**BODY, "stream": True,
                                                            "fake_delay": 0.1,
                                                            "fake_chunks": 50}) as s:
                async for _ in s:
                    pass

        t = asyncio.create_task(consume())
        await asyncio.sleep(0.15)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        await asyncio.sleep(0.05)
        assert be.stats["aborted"] == 1

    run_with_backend(fake_backend_module, fn)


def test_connect_refused() -> None:
    async def main() -> None:
        pool = BackendPool("127.0.0.1", 1, connect_timeout=1)
        with pytest.raises(BackendConnectError):
            await pool.post_json("/v1/completions", {})
        assert pool.stats == (0, 0)

    asyncio.run(main())


def test_sse_decoder_splits() -> None:
    wire = (encode_event(b'{"a":1}') + b": comment\r\n\r\n" + b"data: x\ndata: y\n\n"
            + encode_event(b"[DONE]"))
    for cut in range(len(wire)):
        d = SseDecoder()
        assert d.feed(wire[:cut]) + d.feed(wire[cut:]) == [b'{"a":1}', b"x\ny", b"[DONE]"]
    assert chunk_frame(b"ab") == b"a\r\ndata: ab\n\n\r\n"


def test_every_request_carries_the_workers_token() -> None:
    """Issue 12 §5: a pool built with the worker's token sends it as a bearer on every call
    (JSON and streams); one without sends no authorization header."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            n = int(next(line.split(b":")[1] for line in head.lower().split(b"\r\n")
                         if line.startswith(b"content-length")))
            await reader.readexactly(n)
            heads.append(head.lower())
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: 2\r\n\r\n{}")
            await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        for token in ("tok-0123456789abcdef", ""):
            pool = BackendPool.from_url(f"http://127.0.0.1:{port}", api_token=token)
            try:
                await pool.post_json("/v1/completions", {"prompt": "x"})
                await pool.request("GET", "/v1/models")
            finally:
                await pool.close()
        server.close()

    asyncio.run(main())
    assert len(heads) == 4
    assert all(b"authorization: bearer tok-0123456789abcdef\r\n" in h for h in heads[:2])
    assert not any(b"authorization" in h for h in heads[2:])
