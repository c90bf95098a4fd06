"""The gateway's view of the workers it routes to: membership, load, health, prefix index.

Membership comes from `update()` — the registry actor's routing set (workers of alive nodes)
plus static workers from the config. For every worker the pool keeps a keep-alive
`BackendPool`, scrapes `/metrics` (vLLM's names) for load, follows its KV events into the
global `PrefixIndex`, and builds the `WorkerView`s the scheduler decides on. The view list is
rebuilt only when something changed, so the scheduler's per-view caches stay warm.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from meshd.capabilities import Worker
from meshd.coordinator.gateway.config import RoutingConfig
from meshd.coordinator.gateway.workers.client import BackendError, BackendPool
from meshd.coordinator.gateway.workers.kv_event_feed import KVEventFeed
from meshd.coordinator.gateway.workers.load import WorkerLoad, parse
from meshd.scheduler.prefix_index import PrefixIndex
from meshd.scheduler.types import Role, WorkerView

if TYPE_CHECKING:
    from meshd.coordinator.gateway.workers.cache_monitor import CacheHealthMonitor

log = logging.getLogger("meshd.gateway.workers")
_ROLES = {"prefill": Role.PREFILL, "decode": Role.DECODE, "both": Role.BOTH}


@dataclass(slots=True)
class Entry:
    worker: Worker
    node_id: str
    pool: BackendPool
    load: WorkerLoad = field(default_factory=WorkerLoad)
    healthy: bool = True
    misses: int = 0
    failed_until: float = 0.0  # excluded after a request failure until this time
    metrics_text: str = ""


class WorkerPool:
    def __init__(self, index: PrefixIndex | None = None, routing: RoutingConfig | None = None,
                 follow_events: bool = True, health: CacheHealthMonitor | None = None) -> None:
        """`routing` gives the scrape interval and timeout and the failure backoff; `health`,
        if given, is told of joins, leaves, event batches and scraped counters."""
        self.index = index if index is not None else PrefixIndex()
        self.health = health
        self.feed = KVEventFeed(
            self.index, on_batch=health.on_batch if health else None,
            clock=health.clock if health else None) if follow_events else None
        r = routing or RoutingConfig()
        self.scrape_interval_s = r.scrape_interval_s
        self.scrape_timeout_s = r.scrape_timeout_s
        self.failure_backoff_s = r.failure_backoff_s
        self.entries: dict[str, Entry] = {}
        self._views: list[WorkerView] | None = None
        self._views_until = math.inf  # the cached views expire when a failure backoff ends
        self._task: asyncio.Task[None] | None = None
        # Per model, derived once per membership change (the request path only looks up):
        # the block size prompts are hashed with (the first worker's by id) and whether only
        # plain OpenAI workers serve it.
        self._block_size: dict[str, int] = {}
        self._passthrough: dict[str, bool] = {}

    # -- membership -------------------------------------------------------------------------

    def update(self, workers: Iterable[tuple[str, Worker]]) -> None:
        """Replace the membership with `(node_id, worker)` pairs; unchanged workers keep state."""
        wanted = {w.worker_id: (nid, w) for nid, w in workers}
        for wid in list(self.entries):
            if wid not in wanted or wanted[wid][1] != self.entries[wid].worker:
                self._drop(wid)
        for wid, (nid, w) in wanted.items():
            if wid not in self.entries:
                self.entries[wid] = Entry(w, nid, BackendPool.from_url(w.endpoint))
                if self.feed is not None and w.kv_events_endpoint:
                    self.feed.add(wid, w.kv_events_endpoint, w.kv_events_replay_endpoint)
                self._views = None
                log.info("worker %s (%s, %s) joined the routing set", wid, w.role, w.endpoint)
        self._derive_models()
        if self.health is not None:
            for wid, e in self.entries.items():  # plain OpenAI workers are not prefix-routed
                if e.worker.engine != "openai":
                    self.health.add_worker(wid, self._block_size[e.worker.model],
                                           bool(e.worker.kv_events_endpoint))

    def _derive_models(self) -> None:
        block_size: dict[str, int] = {}
        engines: dict[str, set[str]] = {}
        for _, e in sorted(self.entries.items()):
            w = e.worker
            block_size.setdefault(w.model, w.kv_block_size or 16)
            engines.setdefault(w.model, set()).add(w.engine)
        self._block_size = block_size
        self._passthrough = {m: kinds == {"openai"} for m, kinds in engines.items()}

    def _drop(self, wid: str) -> None:
        entry = self.entries.pop(wid)
        if self.feed is not None:
            self.feed.remove(wid)
        if self.health is not None:
            self.health.remove_worker(wid)
        asyncio.get_running_loop().create_task(entry.pool.close())
        self._views = None
        log.info("worker %s left the routing set", wid)

    def passthrough(self, model: str) -> bool:
        """True when `model` is served only by plain OpenAI-compatible workers (engine
        "openai"), which take text prompts: the gateway proxies instead of driving P/D."""
        return self._passthrough.get(model, False)

    def block_size(self, model: str) -> int | None:
        """The block size the gateway hashes `model`'s prompts with; None: unknown model."""
        return self._block_size.get(model)

    def models(self) -> list[str]:
        return sorted(self._block_size)

    def pool(self, worker_id: str) -> BackendPool:
        return self.entries[worker_id].pool

    def get(self, worker_id: str) -> Entry:
        return self.entries[worker_id]

    # -- health and load --------------------------------------------------------------------

    def mark_failed(self, worker_id: str) -> None:
        """A request to this worker failed: keep it out of routing for a while."""
        entry = self.entries.get(worker_id)
        if entry is not None:
            entry.failed_until = time.monotonic() + self.failure_backoff_s
            self._views = None

    def views(self) -> Sequence[WorkerView]:
        now = time.monotonic()
        if self._views is not None and now < self._views_until:
            return self._views
        views = []
        self._views_until = math.inf
        for wid, e in sorted(self.entries.items()):
            if e.failed_until and e.failed_until <= now:
                e.failed_until = 0.0
            if e.failed_until:
                self._views_until = min(self._views_until, e.failed_until)
            w, ld = e.worker, e.load
            views.append(WorkerView(
                worker_id=wid, role=_ROLES[w.role], model=w.model,
                healthy=e.healthy and not e.failed_until, num_running=ld.num_running,
                num_waiting=ld.num_waiting, kv_usage=ld.kv_usage,
                kv_capacity_blocks=w.kv_capacity_blocks, block_size=w.kv_block_size or 16,
                node_id=e.node_id))
        self._views = views
        return views

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._scrape_loop())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.feed is not None:
            await self.feed.close()
        for e in self.entries.values():
            await e.pool.close()
        self.entries.clear()

    async def scrape_once(self) -> None:
        await asyncio.gather(*(self._scrape(e) for e in list(self.entries.values())))

    async def _scrape_loop(self) -> None:
        while True:
            try:
                await self.scrape_once()
            except Exception:  # keep scraping; one bad worker must not stop the loop
                log.exception("metrics scrape failed")
            await asyncio.sleep(self.scrape_interval_s)

    def _alive_without_load(self, e: Entry) -> None:
        e.misses = 0
        if not e.healthy:
            e.healthy, self._views = True, None

    async def _scrape(self, e: Entry) -> None:
        try:
            r = await e.pool.request("GET", "/metrics", timeout=self.scrape_timeout_s)
            if r.status == 404:  # a plain OpenAI server without metrics: alive, load unknown
                self._alive_without_load(e)
                return
            if r.status != 200:
                raise BackendError(f"/metrics answered {r.status}", e.worker.endpoint)
            text = r.body.decode("utf-8", "replace")
            try:
                load = parse(text)
            except ValueError:  # alive but no Prometheus text: load unknown
                self._alive_without_load(e)
                return
        except BackendError as err:
            e.misses += 1
            if e.misses >= 3 and e.healthy:
                e.healthy = False
                self._views = None
                log.warning("worker %s unhealthy: %s", e.worker.worker_id, err)
            return
        e.misses = 0
        e.metrics_text = text
        if self.health is not None:
            self.health.observe_load(e.worker.worker_id, load)
        if load != e.load or not e.healthy:
            e.load, e.healthy = load, True
            self._views = None
