"""Test helpers: an in-process control server on loopback and agents for it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from meshd import capabilities as caps
from meshd.config import AgentConfig, CoordinatorConfig
from meshd.coordinator.grpc_server import ControlServer
from meshd.coordinator.metrics import ControlMetrics
from meshd.coordinator.store import Store
from meshd.node_agent.agent import Agent
from meshd.node_agent.identity import Identity


def make_report(host: str = "host-a", workers: tuple[caps.Worker, ...] = ()
                ) -> caps.Capabilities:
    return caps.Capabilities(host=caps.Host(host, 2, 8 << 30), workers=workers,
                             attributes={"zone": "test"})


def make_config(state_dir: Path, port: int = 0, **kw: float) -> CoordinatorConfig:
    return CoordinatorConfig(grpc_port=port, metrics_port=0, state_dir=str(state_dir), **kw)


@dataclass
class Running:
    server: ControlServer
    store: Store
    address: str


@contextlib.asynccontextmanager
async def control_server(config: CoordinatorConfig,
                         clock: Callable[[], float] | None = None) -> AsyncIterator[Running]:
    store = Store(config.state_dir)
    server = ControlServer(config, store, ControlMetrics(),
                           **({"clock": clock} if clock else {}))
    port, _ = await server.start()
    try:
        yield Running(server, store, f"127.0.0.1:{port}")
    finally:
        await server.stop(0)
        store.close()


def make_agent(address: str, ident: Identity | None = None, token: str = "",
               report: caps.Capabilities | None = None) -> Agent:
    ident = ident or Identity.generate()
    cfg = AgentConfig(coordinator=address, join_token=token, rpc_timeout_s=2.0,
                      reconnect_max_backoff_s=0.5)
    rep = report or make_report()
    return Agent(cfg, ident, lambda: rep)


async def wait_for(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)
