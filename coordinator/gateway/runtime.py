"""One gateway replica, assembled: worker pool, router, lifecycle handler, HTTP server.

`GatewayRuntime` owns an asyncio loop's worth of serving: it keeps the worker pool's
membership current (the registry's routing set via `membership`, plus static workers from the
config, whose models are read from their `/v1/models`), and serves the OpenAI API on the shared
port. Run it on its own event loop (`run_in_thread`) inside the Ray actor, or directly in tests.
A runtime given its `replica` index also serves its own metrics on a port of its own and
answers /metrics on the shared port with the fleet's (`fleet.py`); without one, /metrics is
its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry.sdk.resources import Resource

from meshd.capabilities import Member
from meshd.coordinator.gateway.config import GatewayConfig, RoutingConfig
from meshd.coordinator.gateway.fleet import FleetMetrics, Peers
from meshd.coordinator.gateway.governance.admission import Governor
from meshd.coordinator.gateway.governance.config import TenantPolicy
from meshd.coordinator.gateway.governance.reload import PolicyWatcher
from meshd.coordinator.gateway.governance.usage import usage_report
from meshd.coordinator.gateway.http.api_request import ApiRequest
from meshd.coordinator.gateway.http.errors import ApiError
from meshd.coordinator.gateway.http.server import GatewayServer
from meshd.coordinator.gateway.privacy.guard import PrivacyGuard
from meshd.coordinator.gateway.records.report import records_report
from meshd.coordinator.gateway.records.store import RecordStore
from meshd.coordinator.gateway.serving.mesh import MeshHandler
from meshd.coordinator.gateway.serving.output_parsers import OutputParsers
from meshd.coordinator.gateway.serving.prompts import PromptBuilder
from meshd.coordinator.gateway.serving.receipts import ReceiptSigner, load_key
from meshd.coordinator.gateway.serving.request_metrics import MeshMetrics
from meshd.coordinator.gateway.serving.responses_memory import ResponsesMemory
from meshd.coordinator.gateway.tracing.context import Sampler
from meshd.coordinator.gateway.tracing.sink import TraceSink, otlp_exporter
from meshd.coordinator.gateway.tracing.tracer import Tracer
from meshd.coordinator.gateway.workers.cache_monitor import CacheHealthMonitor
from meshd.coordinator.gateway.workers.pool import WorkerPool
from meshd.coordinator.gateway.workers.static import discover_static, static_token
from meshd.coordinator.ledger_actor import InProcessLedgerClient, LedgerClient, LocalLedger
from meshd.scheduler.admission.ledger import LedgerConfig
from meshd.scheduler.pd import PDDecider
from meshd.scheduler.prefix_index import IndexSnapshot, PrefixIndex
from meshd.scheduler.profiles import build_selector
from meshd.scheduler.router import Router

log = logging.getLogger("meshd.gateway")
Membership = Callable[[], Awaitable[list[Member]]]
NodeKeys = Callable[[], Awaitable[list[dict[str, Any]]]]
KEYS_TTL_S = 5.0  # how long /v1/meshd/keys serves the trust store's node keys from cache


def tune_gc() -> None:
    """For a process that is a gateway replica: each request allocates a few hundred
    short-lived objects, nearly all freed by reference counting, and the cyclic collector's
    default gen-0 threshold (700 allocations) would scan them every request or two. What is
    alive after start-up is frozen out of collection; gen 0 runs every 20k allocations."""
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)


_RUNTIMES = itertools.count()


def replica_id(replica: int | None) -> str:
    """This replica's name at the fleet ledger: unique per runtime, so a restarted replica
    never speaks for its predecessor (whose leases expire and are reconciled)."""
    return (f"{socket.gethostname()}/{'-' if replica is None else replica}/{os.getpid()}."
            f"{next(_RUNTIMES)}")


def make_router(config: RoutingConfig, index: PrefixIndex) -> Router:
    """The router `[gateway.routing]` describes, over the replica's prefix index."""
    return Router(decode=build_selector(config.profile(config.decode), config.decode),
                  prefill=build_selector(config.profile(config.prefill), config.prefill),
                  pd=PDDecider(config.pd), index=index)


@dataclass
class GatewayRuntime:
    config: GatewayConfig
    membership: Membership | None = None  # the registry's routing set
    snapshot: bytes | None = None  # a sibling replica's prefix index to start from
    replica: int | None = None  # index in the fleet: own metrics port + fleet /metrics
    peers: Peers | None = None  # where the siblings' metrics ports are (default: port rule)
    ledger: LedgerClient | None = None  # the fleet ledger (default: one in this process)
    node_keys: NodeKeys | None = None  # the trust store's node keys (for /v1/meshd/keys)
    span_exporter: Any = None  # an OTel SpanExporter instead of the config's OTLP (tests)

    def __post_init__(self) -> None:
        c = self.config
        if self.ledger is None:
            if c.replicas > 1 and self.replica is not None:
                log.warning("no fleet ledger: limits hold per replica, not across the fleet")
            self.ledger = InProcessLedgerClient(LocalLedger(
                LedgerConfig(ttl_s=c.governance.ledger.lease_ttl_s)))
        self.governor = Governor(c.governance, self.ledger, replica_id(self.replica),
                                 c.limits.max_tokens, keyed=c.api_keys)
        # A new replica starts from a sibling's index snapshot plus the event stream: each
        # worker's feed continues at the snapshot's next seq (replaying what came since).
        self.index = (PrefixIndex.restore(IndexSnapshot.from_bytes(self.snapshot))
                      if self.snapshot else PrefixIndex())
        self.health = CacheHealthMonitor(c.hash_seed)
        self.static_token = static_token(c.static_workers_token_file)
        self.prompts = PromptBuilder(c.tokenizers, c.hash_seed)
        self.privacy = PrivacyGuard(c.privacy, self._tenant_privacy,
                                    lambda model, ids: self.prompts.tokenizer(model).decode(ids))
        self.receipts = ReceiptSigner(load_key(c.receipts.key_file))
        self.records = self._records()
        self.traces, self.tracer = self._tracing()
        self._node_keys: tuple[float, list[dict[str, Any]]] | None = None
        self.pool = WorkerPool(self.index, c.routing, health=self.health)
        self.metrics = MeshMetrics()
        self.metrics.watch_workers(self.pool)
        self.metrics.watch_health(self.health)
        self.handler = MeshHandler(self.pool, make_router(c.routing, self.index),
                                   self.prompts, c.deadlines,
                                   self.metrics, max_inflight=c.limits.max_inflight,
                                   governor=self.governor, privacy=self.privacy,
                                   confidence=c.confidence, receipts=self.receipts,
                                   tracer=self.tracer,
                                   parsers=OutputParsers(c.tool_parsers, c.reasoning_parsers,
                                                         self.prompts.tokenizer),
                                   responses=self._responses())
        self.governor.metrics.register(self.metrics.registry)
        self.privacy.register(self.metrics.registry)
        self.receipts.register(self.metrics.registry)
        self.handler.on_runs = self.health.observe_runs
        self.fleet = (None if self.replica is None else
                      FleetMetrics(c, self.replica, self.metrics.registry, self.peers))
        self.server = GatewayServer(c, self.handler, registry=self.metrics.registry,
                                    models=self.handler.models,
                                    cache_health=self.health.to_json,
                                    workers=self.pool.routing_state,
                                    fleet=self.fleet.exposition if self.fleet else None,
                                    usage=self._usage, keys=self._keys,
                                    requests=self._requests,
                                    governance=self._governance,
                                    count_tokens=self._count_tokens,
                                    response_item=self.handler.responses.item)
        self.server.set_keys(self.governor.policy.keys())
        self.policy = PolicyWatcher(c.governance, self._apply_policy, self.governor.metrics)
        self._task: asyncio.Task[None] | None = None

    def _tracing(self) -> tuple[TraceSink, Tracer | None]:
        """Spans to the OTLP collector `[gateway.tracing]` names (or the injected exporter)."""
        t = self.config.tracing
        exporter = self.span_exporter or (
            otlp_exporter(t.otlp_endpoint, dict(t.otlp_headers), t.export_timeout_s)
            if t.enabled and t.otlp_endpoint else None)
        resource = Resource.create({"service.name": t.service_name,
                                    "service.instance.id": replica_id(self.replica)})
        def node_of(worker_id: str) -> str:
            return self.pool.provenance(worker_id)[0]

        sink = TraceSink(exporter, resource, node_of, t.max_queue, t.export_interval_s,
                         self.records)
        if not t.enabled:
            return sink, None
        return sink, Tracer(Sampler(t.sampler, t.ratio), [sink.add])

    def _responses(self) -> ResponsesMemory:
        """The Responses API's memory: shared by the replicas through `[gateway.records] dir`
        when there is one, else this replica's own."""
        d = self.config.records.dir
        return ResponsesMemory(Path(d).expanduser() / "responses.sqlite" if d else None)

    def _records(self) -> RecordStore | None:
        """This replica's request record store (one file per replica: one writer each)."""
        r = self.config.records
        if not r.dir:
            return None
        name = (f"gateway-{self.replica}.db" if self.replica is not None
                else f"gateway-pid{os.getpid()}-{next(_RUNTIMES)}.db")
        return RecordStore(Path(r.dir).expanduser() / name, r.policy())

    def _count_tokens(self, req: ApiRequest) -> dict[str, Any]:
        """POST /v1/messages/count_tokens: the prompt's length as the model's workers see it
        (its own tokenizer and template, tools included)."""
        block = self.pool.block_size(req.body.model)
        if block is None:
            raise ApiError(404, f"The model {req.body.model!r} does not exist.",
                           param="model", err_type="not_found_error", code="model_not_found")
        return {"input_tokens": len(self.prompts.build(req, block).token_ids)}

    def _governance(self) -> dict[str, Any]:
        """GET /debug/governance: admission, and what the trust stages cost and did."""
        return {**self.governor.describe(), "privacy": self.privacy.describe(),
                "receipts": self.receipts.describe(),
                "confidence": self.handler.confidence_cost.describe(),
                "responses": self.handler.responses.describe(),
                "tracing": self.traces.describe()}

    async def _requests(self, query: dict[str, str]) -> dict[str, Any]:
        """`GET /debug/requests`: this replica's request records and hourly rollups."""
        store = self.records
        if store is None:
            raise ApiError(404, "This gateway keeps no request records ([gateway.records] dir "
                           "is not set).", err_type="not_found_error", code="no_records")
        return await asyncio.to_thread(records_report, store, query)

    def _tenant_privacy(self, tenant: str | None) -> TenantPolicy:
        return self.governor.policy.of(tenant or self.config.governance.default_tenant)

    async def _usage(self, tenant: str | None, path: str) -> dict[str, Any]:
        return await usage_report(self.governor, tenant, path)

    async def _keys(self) -> dict[str, Any]:
        """`GET /v1/meshd/keys`: what a receipt is checked against offline — this replica's
        receipt key and the trust store's node keys, revoked ones with their revocation."""
        now = asyncio.get_running_loop().time()
        cached = self._node_keys
        if self.node_keys is not None and (cached is None or now - cached[0] > KEYS_TTL_S):
            cached = self._node_keys = (now, await self.node_keys())
        return {"object": "meshd.keys", "gateways": [self.receipts.published()],
                "nodes": cached[1] if cached else []}

    def _apply_policy(self, policy: Any) -> None:
        self.governor.apply(policy)
        self.server.set_keys(policy.keys())

    async def refresh(self) -> None:
        members = await self.membership() if self.membership else []
        members += await discover_static(self.config.static_workers,
                                         api_token=self.static_token)
        self.pool.update(members)
        await self.pool.probe_new()  # does each new worker return token ids?

    async def start(self) -> None:
        await self.refresh()
        for worker_id in self.index.workers():  # snapshot entries of workers gone since
            if worker_id not in self.pool.entries:
                self.index.remove_worker(worker_id)
        await self.pool.start()
        if self.fleet is not None:
            await self.fleet.start()
        await self.governor.keeper.start()
        await self.server.start()
        self.traces.start()
        if self.records is not None:
            self.records.start(self.config.records.flush_interval_s)
        self._task = asyncio.get_running_loop().create_task(self._membership_loop())
        self.policy.start()

    async def _membership_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.membership_interval_s)
            try:
                await self.refresh()
            except Exception:  # keep serving with the last known membership
                log.exception("membership refresh failed")

    async def stop(self, timeout_s: float = 10.0) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.policy.stop()
        await self.server.shutdown(timeout_s)
        await self.governor.keeper.stop()  # reports the last usage, hands leases back
        if self.fleet is not None:
            await self.fleet.stop()
        await self.pool.close()
        await asyncio.to_thread(self.traces.close, timeout_s)
        if self.records is not None:
            await asyncio.to_thread(self.records.close, timeout_s)

    def index_snapshot(self) -> bytes:
        """This replica's prefix index, for a new sibling (call on the runtime's loop)."""
        return self.index.snapshot().to_bytes()

    def describe(self) -> dict[str, Any]:
        return {"workers": sorted(self.pool.entries), "models": self.pool.models(),
                "port": self.config.port, "from_snapshot": self.snapshot is not None,
                "replica": self.replica, "metrics_port": self.fleet.port if self.fleet else None}


def run_in_thread(runtime_factory: Callable[[], GatewayRuntime], ready_timeout_s: float = 30.0
                  ) -> tuple[threading.Thread, asyncio.AbstractEventLoop, GatewayRuntime]:
    """Run a runtime on its own event loop (uvloop when available) in a daemon thread."""
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    box: dict[str, Any] = {}
    ready = threading.Event()

    def main() -> None:
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            try:
                rt = runtime_factory()
                await rt.start()
                box["rt"] = rt
            except BaseException as e:  # reported to the caller below
                box["error"] = e
            finally:
                ready.set()

        loop.run_until_complete(boot())
        if "rt" in box:
            loop.run_forever()

    thread = threading.Thread(target=main, name="meshd-gateway", daemon=True)
    thread.start()
    if not ready.wait(ready_timeout_s):
        raise TimeoutError("gateway did not start in time")
    if "error" in box:
        raise box["error"]
    return thread, loop, box["rt"]
