"""The gateway's view of the workers it routes to: membership, load, health, prefix index.

Membership comes from `update()`: the registry's routing set (each worker with its node's
attributes and expert placement) plus static workers. For every worker the pool keeps a
keep-alive `BackendPool`, has `/metrics` scraped (`scrape.py`: load, health, cost calibration),
follows its KV events into the global `PrefixIndex`, and builds the `WorkerView`s with
`scheduler.views.build_view` (the simulator's builder) from the member's facts (`members.py`)
and the latest load. Queued prefill tokens: the worker's `meshd_engine_queued_prefill_tokens`
gauge, or (vLLM) the prompt tokens this replica sent it to prefill and not yet seen answered
(`prefill_started`/`prefill_done`); with both, the larger (the gauge is a scrape old). Views
are rebuilt only for workers whose facts or load changed (the scheduler's caches stay warm).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from meshd.capabilities import Member, Worker
from meshd.coordinator.gateway.config import RoutingConfig
from meshd.coordinator.gateway.workers.calibration import Calibration
from meshd.coordinator.gateway.workers.client import BackendPool
from meshd.coordinator.gateway.workers.kv_event_feed import KVEventFeed
from meshd.coordinator.gateway.workers.load import WorkerLoad
from meshd.coordinator.gateway.workers.members import configured_cost, facts_of
from meshd.coordinator.gateway.workers.prefill_ledger import PrefillLedger
from meshd.coordinator.gateway.workers.protocol import PLAIN, UNKNOWN, probe
from meshd.coordinator.gateway.workers.scrape import LoadScraper
from meshd.scheduler.prefix_index import PrefixIndex
from meshd.scheduler.privacy import node_class
from meshd.scheduler.types import WorkerView
from meshd.scheduler.views import LoadSample, WorkerFacts, build_view

if TYPE_CHECKING:
    from meshd.coordinator.gateway.workers.cache_monitor import CacheHealthMonitor

log = logging.getLogger("meshd.gateway.workers")
QUEUED_RESOLUTION = 256  # prompt tokens: views' queued-token figures are this accurate


@dataclass(slots=True)
class Entry:
    member: Member
    pool: BackendPool
    facts: WorkerFacts
    load: WorkerLoad = field(default_factory=WorkerLoad)
    healthy: bool = True
    misses: int = 0
    failed_until: float = 0.0  # excluded after a request failure until this time
    metrics_text: str = ""
    calibration: Calibration = field(default_factory=Calibration)
    view: WorkerView | None = None  # built from facts + load; None: rebuild on next views()
    protocol: str = UNKNOWN  # protocol.MESH | PLAIN | UNKNOWN: does it return token ids?
    protocol_detail: str = "not probed yet"
    scores: bool = False  # it scores its own tokens (`meshd_confidence`, protocol.py)
    constrains: bool = False  # it enforces a response_format while it samples (protocol.py)

    @property
    def worker(self) -> Worker:
        return self.member.worker

    @property
    def node_id(self) -> str:
        return self.member.node_id


class WorkerPool:
    def __init__(self, index: PrefixIndex | None = None, routing: RoutingConfig | None = None,
                 follow_events: bool = True, health: CacheHealthMonitor | None = None,
                 ledger: PrefillLedger | None = None) -> None:
        """`routing` gives the scrape interval and timeout, the failure backoff and the cost
        parameters; `health`, if given, is told of joins, leaves, event batches and scraped
        counters; `ledger` holds the queued-prefill estimate (a fresh one by default)."""
        self.index = index if index is not None else PrefixIndex()
        self.health = health
        self.feed = KVEventFeed(
            self.index, on_batch=health.on_batch if health else None,
            clock=health.clock if health else None) if follow_events else None
        self.routing = r = routing or RoutingConfig()
        self.failure_backoff_s = r.failure_backoff_s
        self.ledger = ledger or PrefillLedger()
        self.entries: dict[str, Entry] = {}
        self.refused: dict[str, str] = {}  # worker id -> why the last membership skipped it
        self._order: list[str] = []  # entry ids, sorted (the views' order)
        self._views: list[WorkerView] | None = None
        self._views_until = math.inf  # the cached views expire when a failure backoff ends
        self._task: asyncio.Task[None] | None = None
        self.scraper = LoadScraper(self)
        # Per model, derived once per membership change (the request path only looks up):
        # the block size prompts are hashed with (the first worker's by id), whether only
        # plain OpenAI workers serve it, and its configured cost parameters.
        self._block_size: dict[str, int] = {}
        self._passthrough: dict[str, bool] = {}
        self._cost: dict[str, dict[str, float]] = {}

    # -- membership -------------------------------------------------------------------------

    def update(self, members: Iterable[Member]) -> None:
        """Replace the membership; unchanged workers keep their state (a member whose worker
        record changed is replaced, one whose attributes or experts changed is updated)."""
        wanted: dict[str, Member] = {}
        fresh: dict[str, BackendPool] = {}  # the connection pools of new or changed workers
        refused: dict[str, str] = {}
        for m in members:  # a bad entry is skipped and reported, never stops the others
            w = m.worker
            known = self.entries.get(w.worker_id)
            if known is None or known.worker != w:
                try:
                    fresh[w.worker_id] = BackendPool.from_url(w.endpoint,
                                                              api_token=w.api_token)
                except ValueError as bad:
                    refused[w.worker_id] = why = str(bad)
                    if self.refused.get(w.worker_id) != why:
                        log.warning("worker %r of node %s skipped: %s", w.worker_id, m.node_id,
                                    why)
                    continue
            wanted[w.worker_id] = m
        self.refused = refused
        for wid in list(self.entries):
            if wid not in wanted or wanted[wid].worker != self.entries[wid].worker:
                self._drop(wid)
        for wid, m in wanted.items():
            e = self.entries.get(wid)
            if e is None:
                w = m.worker
                e = self.entries[wid] = Entry(m, fresh[wid],
                                              facts_of(m, self._model_cost(w.model)))
                if w.engine == "openai":
                    e.protocol, e.protocol_detail = PLAIN, "plain OpenAI-compatible server"
                if self.feed is not None and w.kv_events_endpoint:
                    self.feed.add(wid, w.kv_events_endpoint, w.kv_events_replay_endpoint,
                                  w.api_token if w.engine == "embedded" else "")
                self._views = None
                log.info("worker %s (%s, %s) joined the routing set", wid, w.role, w.endpoint)
            elif m != e.member:
                e.member = m
                self.refacts(e)
        self._order = sorted(self.entries)
        self._derive_models()
        if self.health is not None:
            for wid, e in self.entries.items():  # plain OpenAI workers are not prefix-routed
                if e.worker.engine != "openai":
                    self.health.add_worker(wid, self._block_size[e.worker.model],
                                           bool(e.worker.kv_events_endpoint))

    def _model_cost(self, model: str) -> dict[str, float]:
        cost = self._cost.get(model)
        if cost is None:
            cost = self._cost[model] = configured_cost(self.routing, model)
        return cost

    def refacts(self, e: Entry) -> None:
        """Rebuild `e`'s facts (its member or its cost calibration changed)."""
        cost = self._model_cost(e.worker.model)
        if e.calibration.published:
            cost = {**cost, **e.calibration.published}
        e.facts = facts_of(e.member, cost)
        self.changed(e)

    def changed(self, e: Entry) -> None:
        """`e`'s facts or load changed: its view is rebuilt on the next `views()`."""
        e.view = None
        self._views = None

    def _derive_models(self) -> None:
        block_size: dict[str, int] = {}
        mesh: set[str] = set()
        for wid in self._order:
            e = self.entries[wid]
            w = e.worker
            block_size.setdefault(w.model, w.kv_block_size or 16)
            if e.protocol != PLAIN:
                mesh.add(w.model)
        self._block_size = block_size
        self._passthrough = {m: m not in mesh for m in block_size}

    def _drop(self, wid: str) -> None:
        entry = self.entries.pop(wid)
        self._order = sorted(self.entries)
        self.ledger.drop_worker(wid)
        if self.feed is not None:
            self.feed.remove(wid)
        if self.health is not None:
            self.health.remove_worker(wid)
        asyncio.get_running_loop().create_task(entry.pool.close())
        self._views = None
        log.info("worker %s left the routing set", wid)

    def passthrough(self, model: str) -> bool:
        """True when `model` is served only by plain OpenAI-compatible workers (engine
        "openai", or a worker that does not return token ids): the gateway proxies requests
        to them as they are instead of driving P/D."""
        return self._passthrough.get(model, False)

    def provenance(self, worker_id: str) -> tuple[str, bool]:
        """(node id, whether it signs its outputs) of a worker, for receipts: the embedded
        engine attests with its node's key (the agent launches it with one); vLLM cannot."""
        e = self.entries.get(worker_id)
        if e is None:
            return "", False
        return e.node_id, e.worker.engine == "embedded"

    def scores_itself(self, worker_id: str) -> bool:
        """Does the worker score its own tokens (`meshd_confidence`)? Probed on join."""
        e = self.entries.get(worker_id)
        return e is not None and e.scores

    def constrains(self, worker_id: str) -> bool:
        """Does the worker enforce a `response_format` while it samples? Probed on join."""
        e = self.entries.get(worker_id)
        return e is not None and e.constrains

    def constrained_model(self, model: str) -> bool:
        """Is any healthy worker of `model` one that enforces a `response_format`?"""
        return any(e.constrains and e.healthy for e in self.entries.values()
                   if e.worker.model == model)

    def node_attributes(self, model: str) -> list[Mapping[str, str]]:
        """The node attributes of every healthy worker serving `model` (privacy routing asks
        whether an eligible one exists before it routes)."""
        return [e.member.attributes for e in self.entries.values()
                if e.worker.model == model and e.healthy]

    def passthrough_workers(self, model: str) -> list[str]:
        """Workers a request for `model` may be passed through to (healthy, not backing off),
        the mesh-capable ones first."""
        now = time.monotonic()
        ok = [e for wid in self._order if (e := self.entries[wid]).worker.model == model
              and e.healthy and not (e.failed_until and e.failed_until > now)]
        return [e.worker.worker_id for e in sorted(ok, key=lambda e: e.protocol == PLAIN)]

    async def probe_new(self, timeout_s: float = 2.0) -> None:
        """Ask every worker not probed yet whether it returns token ids (`protocol.py`); a
        worker that does not is left out of the mesh path's views (and is what a model
        served only by such workers is passed through to)."""
        todo = [e for e in self.entries.values() if e.protocol == UNKNOWN]
        if not todo:
            return
        results = await asyncio.gather(*(probe(e.pool, e.worker.model, timeout_s)
                                         for e in todo))
        changed = False
        for e, r in zip(todo, results, strict=True):
            if self.entries.get(e.worker.worker_id) is not e:
                continue  # left while we asked
            e.protocol_detail = r.detail
            if r.protocol != UNKNOWN:
                e.protocol, e.scores, e.constrains = r.protocol, r.scores, r.constrains
                changed = True
            if r.protocol == PLAIN:
                log.warning("worker %s (%s): %s; the mesh path does not route to it",
                            e.worker.worker_id, e.worker.endpoint, r.detail)
        if changed:
            self._derive_models()
            self._views = None

    def routing_state(self) -> list[dict[str, object]]:
        """One row per worker, for `/debug/workers` and `meshd status`; a member skipped as
        malformed is a row with protocol `refused` and the reason."""
        now = time.monotonic()
        rows: list[dict[str, object]] = [
            {"worker_id": wid, "model": e.worker.model, "role": e.worker.role,
             "engine": e.worker.engine, "node_id": e.node_id, "healthy": e.healthy,
             "backoff_s": round(max(0.0, e.failed_until - now), 3),
             "protocol": e.protocol, "protocol_detail": e.protocol_detail,
             "queued_prefill_tokens": self._sample(wid, e).num_waiting_tokens,
             "experts": len(e.facts.experts), "class": node_class(e.member.attributes),
             "cost": dict(e.calibration.published)}
            for wid, e in ((w, self.entries[w]) for w in self._order)]
        rows += [{"worker_id": wid, "healthy": False, "protocol": "refused",
                  "protocol_detail": why} for wid, why in sorted(self.refused.items())]
        return rows

    def block_size(self, model: str) -> int | None:
        """The block size the gateway hashes `model`'s prompts with; None: unknown model."""
        return self._block_size.get(model)

    def models(self) -> list[str]:
        return sorted(self._block_size)

    def pool(self, worker_id: str) -> BackendPool:
        return self.entries[worker_id].pool

    # -- the queued-prefill estimate (called by the request path) ---------------------------

    def prefill_started(self, worker_id: str, tokens: int) -> int:
        """`tokens` prompt tokens were just sent to `worker_id` to prefill (a remote prefill,
        or a decode that prefills locally: the prompt minus the prefix the worker caches).
        Returns a handle for `prefill_done`. Cheap; never raises for an unknown worker."""
        handle = self.ledger.start(worker_id, tokens)
        e = self.entries.get(worker_id)
        if e is not None and tokens > 0:
            self._ledger_moved(worker_id, e)
        return handle

    def prefill_done(self, handle: int) -> None:
        """The prefill answer (or first token) for `handle` came back, or the attempt failed.
        Idempotent: a closed, expired or unknown handle is ignored."""
        wid = self.ledger.done(handle)
        e = self.entries.get(wid) if wid is not None else None
        if e is not None and wid is not None:
            self._ledger_moved(wid, e)

    def _ledger_moved(self, wid: str, e: Entry) -> None:
        """Rebuild `e`'s view only when its queued-token figure moved by QUEUED_RESOLUTION or
        more: the load scorer weighs queued tokens on a scale of thousands, and a view rebuilt
        per request would also rebuild the router's cached candidate pools per request."""
        v = e.view
        if v is None or abs(self._sample(wid, e).num_waiting_tokens - v.num_waiting_tokens) \
                >= QUEUED_RESOLUTION:
            self.changed(e)

    # -- health and load --------------------------------------------------------------------

    def mark_failed(self, worker_id: str) -> None:
        """A request to this worker failed: keep it out of routing for a while."""
        entry = self.entries.get(worker_id)
        if entry is not None:
            entry.failed_until = time.monotonic() + self.failure_backoff_s
            self.changed(entry)

    def views(self) -> Sequence[WorkerView]:
        now = time.monotonic()
        if self._views is not None and now < self._views_until:
            return self._views
        views = []
        self._views_until = math.inf
        for wid in self._order:
            e = self.entries[wid]
            if e.protocol == PLAIN:  # passthrough only (`passthrough_workers`)
                continue
            if e.failed_until and e.failed_until <= now:
                e.failed_until, e.view = 0.0, None
            if e.failed_until:
                self._views_until = min(self._views_until, e.failed_until)
            if e.view is None:
                e.view = build_view(e.facts, self._sample(wid, e))
            views.append(e.view)
        self._views = views
        return views

    def _sample(self, wid: str, e: Entry) -> LoadSample:
        ld = e.load
        own = self.ledger.tokens(wid)
        queued = own if ld.num_waiting_tokens is None else max(ld.num_waiting_tokens, own)
        return LoadSample(ld.num_running, ld.num_waiting, queued, ld.kv_usage,
                          e.healthy and not e.failed_until)

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.scraper.run())

    async def scrape_once(self) -> None:
        """Scrape every worker's /metrics now (tests; the loop does it every interval)."""
        await self.scraper.scrape_once()

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
        self._order = []
