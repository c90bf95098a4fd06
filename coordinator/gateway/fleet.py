"""One replica's place in the gateway fleet's metrics: its own port, and the shared view.

Replica `i` serves its own registry alone on GET /metrics of a port of its own
(`gateway.metrics_port` + i, or a free port when that is 0): the per-replica view. On the shared
API port, GET /metrics answers the fleet view (`http/fleet_metrics.py`): this replica's figures
merged with every sibling's own port, each asked with a deadline (`gateway.metrics_timeout_s`
for the whole scrape); a sibling that does not answer in time is left out and the view says so.

Where the siblings are is a `Peers` callable: `port_rule` (replica i at `metrics_port + i`) or,
for free ports, what each Ray actor publishes (`actor.py`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from meshd.coordinator.gateway.config import GatewayConfig
from meshd.coordinator.gateway.http import errors
from meshd.coordinator.gateway.http.fleet_metrics import Reply, fleet_exposition
from meshd.coordinator.gateway.workers.client import BackendError, BackendPool

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("meshd.gateway")
_WILDCARD = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


class Peer(NamedTuple):
    replica: int
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


Peers = Callable[[], Awaitable[Sequence[Peer]]]


def connect_host(host: str) -> str:
    """Where a sibling on this host reaches a server bound to `host`."""
    return _WILDCARD.get(host, host)


def port_rule(config: GatewayConfig) -> Peers:
    """Replica i at `metrics_port + i` on the gateway host; none known when the ports are free
    ones (`metrics_port` 0)."""
    host, base = connect_host(config.host), config.metrics_port
    found = tuple(Peer(i, host, base + i) for i in range(config.replicas)) if base else ()

    async def peers() -> Sequence[Peer]:
        return found

    return peers


class FleetMetrics:
    """Replica `replica`'s metrics port and its fleet view. `start()` binds the port (an
    OSError if taken), `exposition(local)` merges `local` (this replica's exposition) with the
    siblings' and never raises or waits past the deadline, `stop()` closes everything. Use from
    the runtime's event loop: the port is served there, so collectors run on the loop thread
    that owns their state."""

    def __init__(self, config: GatewayConfig, replica: int, registry: CollectorRegistry,
                 peers: Peers | None = None) -> None:
        self.config, self.replica, self.registry = config, replica, registry
        self.peers = peers or port_rule(config)
        self.timeout_s = config.metrics_timeout_s
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._pools: dict[tuple[str, int], BackendPool] = {}

    @property
    def address(self) -> str:
        return f"{connect_host(self.config.host)}:{self.port}"

    async def start(self) -> int:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/metrics", self._own)
        app.router.add_route("*", "/{tail:.*}", self._other)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        c = self.config
        try:
            await web.TCPSite(runner, c.host, c.metrics_port + self.replica if c.metrics_port
                              else 0).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def exposition(self, local: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        try:
            peers = await asyncio.wait_for(self.peers(), self.timeout_s / 2)
        except Exception as e:  # discovery down: the view has this replica's figures alone
            log.warning("gateway fleet metrics: no sibling addresses: %s", e)
            peers = ()
        found = {p.replica: p for p in peers if p.replica != self.replica}
        wanted = sorted({*range(self.config.replicas), *found} - {self.replica})
        budget = max(deadline - loop.time(), 0.05)
        others = await asyncio.gather(*(self._fetch(i, found.get(i), budget) for i in wanted))
        await self._prune(found.values())
        mine = Reply(self.replica, self.address, local.decode("utf-8", "replace"))
        try:
            return fleet_exposition([mine, *others], self.config.replicas)
        except Exception:  # a bug, not a sibling's bad text (that is left out): serve our own
            log.exception("gateway fleet metrics: merge failed")
            return local

    async def _fetch(self, replica: int, peer: Peer | None, timeout: float) -> Reply:
        if peer is None:
            return Reply(replica, "", None)
        key = (peer.host, peer.port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = BackendPool(peer.host, peer.port, max_connections=2,
                                                  connect_timeout=self.timeout_s,
                                                  read_timeout=self.timeout_s)
        try:
            r = await asyncio.wait_for(pool.request("GET", "/metrics", timeout=timeout),
                                       timeout)
        except (BackendError, TimeoutError) as e:
            log.info("gateway replica %d (%s) left out of the fleet metrics: %s",
                     replica, peer.address, e)
            return Reply(replica, peer.address, None)
        if r.status != 200:
            return Reply(replica, peer.address, None)
        return Reply(replica, peer.address, r.body.decode("utf-8", "replace"))

    async def _prune(self, current: Iterable[Peer]) -> None:
        """Drop the pools of addresses no sibling has any more (a restarted one moved)."""
        keep = {(p.host, p.port) for p in current}
        for key in [k for k in self._pools if k not in keep]:
            await self._pools.pop(key).close()

    async def _own(self, request: web.Request) -> web.Response:
        from aiohttp import web

        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _other(self, request: web.Request) -> web.Response:
        from aiohttp import web

        err = (errors.method_not_allowed(request.method, request.path)
               if request.path == "/metrics" else errors.not_found(request.path[:200]))
        return web.Response(status=err.status, body=err.body(), content_type="application/json")
