"""Gateway test harness: a fake OpenAI worker and a gateway on 127.0.0.1, in one background
uvloop thread, so sync clients (openai, http.client, raw sockets) can drive them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from support.fake import load_fake_backend

from meshd.coordinator.gateway.config import GatewayConfig
from meshd.coordinator.gateway.http.server import GatewayServer
from meshd.coordinator.gateway.serving.proxy import ProxyHandler
from meshd.coordinator.gateway.workers.client import BackendPool

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[3]


class LoopThread:
    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class Stack:
    lt: LoopThread
    backend: Any  # FakeBackend
    backend_port: int
    server: GatewayServer
    handler: ProxyHandler

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def make_stack(lt: LoopThread, config: GatewayConfig | None = None) -> Stack:
    fb = load_fake_backend()
    cfg = config or GatewayConfig()

    async def up() -> Stack:
        be = fb.FakeBackend(chunks=4)
        bport = await be.start()
        handler = ProxyHandler([BackendPool("127.0.0.1", bport, read_timeout=5.0)], ["fake"])
        server = GatewayServer(replace(cfg, port=0), handler, models=handler.models)
        await server.start()
        return Stack(lt, be, bport, server, handler)

    return lt.run(up())


def stop_stack(s: Stack) -> None:
    async def down() -> None:
        await s.server.shutdown(2.0)
        await s.handler.close()
        if s.backend.server is not None:
            s.backend.server.close()

    s.lt.run(down())


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.stop()


@pytest.fixture(scope="module")
def stack_factory(loop_thread: LoopThread) -> Iterator[Callable[[GatewayConfig], Stack]]:
    """Makes extra stacks with a given config; all stopped at module end."""
    made: list[Stack] = []

    def make(cfg: GatewayConfig) -> Stack:
        made.append(make_stack(loop_thread, cfg))
        return made[-1]

    yield make
    for s in made:
        stop_stack(s)


@pytest.fixture(scope="module")
def fake_backend_module() -> Any:
    return load_fake_backend()


@pytest.fixture(scope="module")
def stack(loop_thread: LoopThread) -> Iterator[Stack]:
    s = make_stack(loop_thread)
    yield s
    stop_stack(s)
