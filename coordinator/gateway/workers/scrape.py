"""Worker load from each worker's `/metrics`, every `[gateway.routing] scrape_interval_s`.

`LoadScraper` reads every member's exposition (`load.parse`: vLLM's names; the embedded engine
serves the same), keeps its health (three misses in a row: unhealthy; a plain OpenAI server
without `/metrics` stays alive with unknown load), feeds the cache-routing monitor and the
per-worker cost calibration, and tells the pool which entries changed (`pool.changed`,
`pool.refacts`), so only their views are rebuilt. Runs on the pool's event loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from meshd.coordinator.gateway.workers.client import BackendError
from meshd.coordinator.gateway.workers.load import WorkerLoad, parse
from meshd.scheduler.cost_model import CostModel

if TYPE_CHECKING:
    from meshd.coordinator.gateway.workers.pool import Entry, WorkerPool

log = logging.getLogger("meshd.gateway.workers")


class LoadScraper:
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    async def scrape_once(self) -> None:
        await asyncio.gather(*(self._scrape(e) for e in list(self.pool.entries.values())))
        for wid in self.pool.ledger.expire():
            e = self.pool.entries.get(wid)
            if e is not None:
                log.warning("worker %s: a queued-prefill handle was never closed", wid)
                self.pool.changed(e)

    async def run(self) -> None:
        """Scrape every `scrape_interval_s` until cancelled."""
        while True:
            try:
                await self.scrape_once()
            except Exception:  # keep scraping; one bad worker must not stop the loop
                log.exception("metrics scrape failed")
            await asyncio.sleep(self.pool.routing.scrape_interval_s)

    def _alive_without_load(self, e: Entry) -> None:
        e.misses = 0
        if not e.healthy:
            e.healthy = True
            self.pool.changed(e)

    async def _scrape(self, e: Entry) -> None:
        try:
            r = await e.pool.request("GET", "/metrics", timeout=self.pool.routing.scrape_timeout_s)
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
                self.pool.changed(e)
                log.warning("worker %s unhealthy: %s", e.worker.worker_id, err)
            return
        e.misses = 0
        e.metrics_text = text
        if self.pool.health is not None:
            self.pool.health.observe_load(e.worker.worker_id, load)
        if self.pool.routing.calibrate_cost and self._calibrate(e, load):
            self.pool.refacts(e)
        if load != e.load or not e.healthy:
            e.load, e.healthy = load, True
            self.pool.changed(e)

    def _calibrate(self, e: Entry, load: WorkerLoad) -> bool:
        """Feed the scrape to `e`'s calibration; True when its published figures changed."""
        f = e.facts
        ctx = int(load.kv_usage * f.kv_capacity_blocks * f.block_size)
        return e.calibration.observe(load, CostModel.from_params(f.cost), ctx)
