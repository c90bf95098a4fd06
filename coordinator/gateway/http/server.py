"""`GatewayServer`: the OpenAI-compatible HTTP/1.1 front of meshd (uvloop-friendly asyncio).

Lifecycle: `await start()` binds (with SO_REUSEPORT, so several replica processes can share
one port), `await shutdown()` stops accepting, closes idle connections, lets in-flight
requests finish until `shutdown_timeout`, then cancels what is left. Per request the server
checks route, method, API key, content type and size, decodes and validates the JSON into an
`ApiRequest`, and runs `handler.handle(req, responder)` in a task (see `api_request.py` for the
contract). Everything else (errors, /v1/models, /health, /metrics, /openapi.json) is answered
inline, as is GET /debug/cache-health (the `cache_health` callable's JSON); with a `fleet`
view, GET /metrics runs in a task (it asks the sibling replicas), as does GET /v1/meshd/usage
(the `usage` view asks the ledger). Nothing is logged per
request; counters are in `stats` and on GET /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from meshd.api_errors import loads_body
from meshd.coordinator.gateway.config import GatewayConfig
from meshd.coordinator.gateway.http import errors
from meshd.coordinator.gateway.http.api_request import ApiRequest, Endpoint, Handler
from meshd.coordinator.gateway.http.connection import HttpConnection, Pending
from meshd.coordinator.gateway.http.dialect_requests import parse_messages, parse_responses
from meshd.coordinator.gateway.http.errors import ApiError
from meshd.coordinator.gateway.http.openai_api import parse_chat, parse_completion
from meshd.coordinator.gateway.http.openapi import SPEC_BYTES
from meshd.coordinator.gateway.http.responder import Responder
from meshd.coordinator.gateway.http.routes import AUTHENTICATED, INFERENCE, Route, item_id
from meshd.coordinator.gateway.http.stats import GatewayStats, StatsCollector

log = logging.getLogger(__name__)
_RID_OK = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_JSON_CT = b"application/json"
_HEALTH_OK, _HEALTH_DRAIN = b'{"status":"ok"}', b'{"status":"draining"}'
_PROM_CT = CONTENT_TYPE_LATEST.encode()
# This replica's exposition in, the fleet's out (`gateway/fleet.py`); never raises, bounded.
FleetView = Callable[[bytes], Awaitable[bytes]]
# GET /v1/meshd/usage: (the caller's tenant or None without auth, the path with its query).
UsageView = Callable[[str | None, str], Awaitable[dict[str, Any]]]
KeysView = Callable[[], Awaitable[dict[str, Any]]]
RequestsView = Callable[[dict[str, str]], Awaitable[dict[str, Any]]]
# GET / DELETE /v1/responses/{id} and GET .../input_items: (method, id, the caller's tenant,
# the sub-resource or "", the query string) -> the JSON answer
ItemView = Callable[[str, str, str | None, str, str], Awaitable[dict[str, Any]]]


class GatewayServer:
    """One gateway replica. `models` lists model ids for GET /v1/models (default: none).
    `registry` is exported on /metrics; the gateway's own counters are
    added to it. `fleet`, if given, turns /metrics into the fleet's view: it gets this
    registry's exposition and answers the merged one. `cache_health` answers
    GET /debug/cache-health, `workers` GET /debug/workers, `governance` GET /debug/governance
    and `usage` GET /v1/meshd/usage (None: 404). Use from one event loop."""

    def __init__(self, config: GatewayConfig, handler: Handler, *,
                 registry: CollectorRegistry | None = None,
                 models: Callable[[], Sequence[str]] | None = None,
                 cache_health: Callable[[], dict[str, Any]] | None = None,
                 workers: Callable[[], list[dict[str, Any]]] | None = None,
                 fleet: FleetView | None = None,
                 usage: UsageView | None = None,
                 keys: KeysView | None = None,
                 requests: RequestsView | None = None,
                 governance: Callable[[], dict[str, Any]] | None = None,
                 count_tokens: Callable[[ApiRequest], dict[str, Any]] | None = None,
                 response_item: ItemView | None = None) -> None:
        self.config = config
        self.handler = handler
        self.registry = registry if registry is not None else CollectorRegistry()
        self.stats = GatewayStats()
        self.registry.register(StatsCollector(self.stats))
        self._models = models or tuple
        self._cache_health = cache_health
        self._workers = workers
        self._fleet = fleet
        self._usage = usage
        self._keys_view = keys
        self._requests_view = requests
        self._governance = governance
        self._count_tokens = count_tokens
        self._response_item = response_item
        self._keys: dict[bytes, str] = {}  # sha256(key) -> tenant
        self.set_keys({})
        self.conns: set[HttpConnection] = set()
        self.now = time.monotonic()
        self.draining = False
        self.port = config.port
        # Set by start(): the loop the server runs on (asyncio.get_running_loop() costs a
        # getpid() syscall per call on CPython 3.11: the hot path never calls it).
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._rid_prefix = f"gw-{os.urandom(4).hex()}-"
        self._rid_n = 0

    def set_keys(self, extra: dict[str, str]) -> None:
        """The API keys: `gateway.api_keys` (tenant -> key) and `extra` (key -> tenant, the
        governance policy's, replaced at every policy reload)."""
        keys = {k: t for t, k in self.config.api_keys.items()}
        keys.update(extra)
        self._keys = {hashlib.sha256(k.encode()).digest(): t for k, t in keys.items()}

    # ---- lifecycle
    async def start(self) -> None:
        loop = self.loop = asyncio.get_running_loop()
        self.now = loop.time()
        self._server = await loop.create_server(
            lambda: HttpConnection(self), self.config.host, self.config.port,
            reuse_port=self.config.http.reuse_port, backlog=self.config.http.backlog)
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = loop.create_task(self._sweep())

    async def shutdown(self, timeout: float | None = None) -> None:
        """Graceful stop: no new connections, finish in-flight requests within `timeout`
        (default `shutdown_timeout`), then cancel handlers and drop what is left."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for c in list(self.conns):
            c.close_when_idle = True
            if c.responder is not None and not c.responder.started:
                c.responder.keep_alive = False
            if c.is_idle():
                c.close()
        deadline = time.monotonic() + (timeout or self.config.http.shutdown_timeout_s)
        while self.conns and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for c in list(self.conns):
            if c.task is not None:
                c.task.cancel()
            c.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await asyncio.sleep(0)

    async def _sweep(self) -> None:
        """Enforce every client-side deadline once per `sweep_interval_s`."""
        cfg = self.config.http
        handler_timeout = self.config.handler_timeout_s
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(cfg.sweep_interval_s)
            now = self.now = loop.time()
            for c in list(self.conns):
                if c.read_deadline and now > c.read_deadline:
                    if c.task is None and not c.queue:
                        c.fatal(ApiError(408, "Timed out reading the request.",
                                         code="request_timeout"))
                        c.pump()
                    else:
                        c.abort()
                elif c.task is not None:
                    if now - c.task_started > handler_timeout and not c.timed_out:
                        c.timed_out = True
                        self.stats.handler_timeouts += 1
                        c.task.cancel()
                elif c.is_idle() and now > c.idle_deadline:
                    c.close()

    # ---- per request
    def dispatch(self, conn: HttpConnection, p: Pending) -> None:
        """Answer `p` inline, or start its handler task on `conn`."""
        rid = p.rid.decode() if p.rid is not None and _RID_OK.fullmatch(p.rid) else None
        if rid is None:
            self._rid_n += 1
            rid = f"{self._rid_prefix}{self._rid_n:x}"
        responder = Responder(conn, rid, p.keep_alive and not p.close_after)
        try:
            route = p.route
            if route is Route.MESSAGES or route is Route.COUNT_TOKENS:  # Anthropic's shape
                responder.anthropic = True
            if p.error is not None:
                raise p.error
            tenant = self._authenticate(p.auth, p.api_key) if self._keys and \
                route in AUTHENTICATED else None
            if route in INFERENCE:
                req = self._parse(p, route, rid, tenant)
                conn.start_task(self.handler.handle(req, responder), responder)
            elif route is Route.COUNT_TOKENS:
                if self._count_tokens is None:
                    raise errors.not_found("/v1/messages/count_tokens")
                req = self._parse(p, Route.MESSAGES, rid, tenant, count_only=True)
                responder.send(200, orjson.dumps(self._count_tokens(req)))
            elif route is Route.RESPONSE_ITEM:
                if self._response_item is None:
                    raise errors.not_found(p.path.decode("latin-1"))
                ident, part = item_id(p.path)
                view = self._response_item(p.method.decode(), ident, tenant, part,
                                           p.path.partition(b"?")[2].decode("latin-1"))
                conn.start_task(self._json_task(view, responder), responder)
            elif route is Route.MODELS:
                responder.send(200, self._models_body())
            elif route is Route.HEALTH:
                responder.send(503 if self.draining else 200,
                               _HEALTH_DRAIN if self.draining else _HEALTH_OK)
            elif route is Route.METRICS:
                self._metrics(conn, responder)
            elif route is Route.OPENAPI:
                responder.send(200, SPEC_BYTES)
            elif route is Route.CACHE_HEALTH:
                if self._cache_health is None:
                    raise errors.not_found("/debug/cache-health")
                responder.send(200, orjson.dumps(self._cache_health()))
            elif route is Route.WORKERS:
                if self._workers is None:
                    raise errors.not_found("/debug/workers")
                responder.send(200, orjson.dumps({"workers": self._workers()}))
            elif route is Route.GOVERNANCE:
                if self._governance is None:
                    raise errors.not_found("/debug/governance")
                responder.send(200, orjson.dumps(self._governance()))
            elif route is Route.USAGE:
                if self._usage is None:
                    raise errors.not_found("/v1/meshd/usage")
                path = p.path.decode("latin-1")
                conn.start_task(self._usage_task(self._usage, tenant, path, responder),
                                responder)
            elif route is Route.REQUESTS:
                if self._requests_view is None:
                    raise errors.not_found("/debug/requests")
                query = _query(p.path)
                conn.start_task(self._json_task(self._requests_view(query), responder),
                                responder)
            elif route is Route.KEYS:
                if self._keys_view is None:
                    raise errors.not_found("/v1/meshd/keys")
                conn.start_task(self._keys_task(self._keys_view, responder), responder)
        except ApiError as e:
            responder.send_error(e)

    def _parse(self, p: Pending, route: Route, rid: str, tenant: str | None,
               count_only: bool = False) -> ApiRequest:
        """`count_only`: a count_tokens body (a Messages body without `max_tokens`)."""
        ct = p.ctype
        if ct is not None and not ct.lower().startswith(_JSON_CT):
            raise errors.unsupported_media_type(ct.decode("latin-1"))
        obj = loads_body(p.body)  # the engine's worker server decodes with the same rules
        if count_only and isinstance(obj, dict):
            if "max_tokens" in obj or "stream" in obj:
                raise errors.invalid("count_tokens takes a Messages body without "
                                     "'max_tokens' and 'stream'.",
                                     "max_tokens" if "max_tokens" in obj else "stream")
            obj = {**obj, "max_tokens": 1}
        lim = self.config.limits
        privacy = p.privacy.decode("latin-1").strip().lower() if p.privacy else ""
        halt = p.halt_below.decode("latin-1").strip() if p.halt_below else ""
        receipt = p.receipt.decode("latin-1") if p.receipt else ""
        if route is Route.CHAT:
            return ApiRequest(Endpoint.CHAT, rid, parse_chat(obj, lim), obj, p.body, tenant,
                              self.loop.time(), privacy, halt, receipt, p.traceparent)
        if route is Route.MESSAGES or route is Route.RESPONSES:
            endpoint, (body, dialect) = ((Endpoint.MESSAGES, parse_messages(obj, lim))
                                         if route is Route.MESSAGES else
                                         (Endpoint.RESPONSES, parse_responses(obj, lim)))
            return ApiRequest(endpoint, rid, body, obj, p.body, tenant, self.loop.time(),
                              privacy, halt, receipt, p.traceparent, dialect)
        return ApiRequest(Endpoint.COMPLETIONS, rid, parse_completion(obj, lim), obj, p.body,
                          tenant, self.loop.time(), privacy, halt, receipt, p.traceparent)

    def _metrics(self, conn: HttpConnection, responder: Responder) -> None:
        local = generate_latest(self.registry)  # before the scrape itself is in flight
        if self._fleet is None:
            responder.send(200, local, _PROM_CT)
        else:
            conn.start_task(self._fleet_metrics(self._fleet, local, responder), responder)

    @staticmethod
    async def _usage_task(usage: UsageView, tenant: str | None, path: str,
                          responder: Responder) -> None:
        responder.send(200, orjson.dumps(await usage(tenant, path)))

    @staticmethod
    async def _json_task(pending: Awaitable[dict[str, Any]], responder: Responder) -> None:
        responder.send(200, orjson.dumps(await pending))

    @staticmethod
    async def _keys_task(keys: KeysView, responder: Responder) -> None:
        try:
            doc = await keys()
        except Exception as e:  # the registry is unreachable: say so, never a partial list
            log.warning("/v1/meshd/keys: %s", e)
            raise ApiError(503, "The mesh's node keys are unavailable (the coordinator's "
                           "registry did not answer); retry shortly.", err_type="server_error",
                           code="keys_unavailable", retry_after=1.0) from None
        responder.send(200, orjson.dumps(doc))

    @staticmethod
    async def _fleet_metrics(fleet: FleetView, local: bytes, responder: Responder) -> None:
        responder.send(200, await fleet(local), _PROM_CT)

    def _authenticate(self, auth: bytes | None, api_key: bytes | None = None) -> str:
        """The tenant of the bearer token (or of `x-api-key`, as Anthropic's clients send it).
        Keys are looked up by their SHA-256, so the time taken says nothing about how much of
        a key a guess got right, and is the same for one key or ten thousand."""
        token = auth[7:] if auth is not None and auth[:7].lower() == b"bearer " else (
            api_key or b"")
        found = self._keys.get(hashlib.sha256(token).digest())
        if found is None:
            raise errors.unauthorized()
        return found

    def _models_body(self) -> bytes:
        return orjson.dumps({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "meshd"}
            for m in self._models()]})

    def not_found(self, path: bytes) -> ApiError:
        return errors.not_found(path.decode("latin-1")[:200])

    def method_not_allowed(self, method: bytes, path: bytes) -> ApiError:
        return errors.method_not_allowed(method.decode("latin-1"), path.decode("latin-1"))

    async def run_handler(self, conn: HttpConnection, coro: Coroutine[Any, Any, None]) -> None:
        """Run one handler coroutine and make sure its request gets exactly one answer."""
        r = conn.responder
        assert r is not None
        self.stats.in_flight += 1
        try:
            await coro
            if not r.finished:
                self._fail(r, errors.internal("The handler returned without a response."))
        except ApiError as e:
            self._fail(r, e)
        except asyncio.CancelledError:
            if conn.timed_out:
                conn.timed_out = False
                self._fail(r, errors.gateway_timeout("The request exceeded handler_timeout."))
            elif not conn.closed:
                conn.abort()  # cancelled by shutdown
        except Exception:
            log.exception("gateway handler failed (request %s)", r.request_id)
            self._fail(r, errors.internal())
        finally:
            self.stats.in_flight -= 1
            conn.task_finished()

    @staticmethod
    def _fail(r: Responder, err: ApiError) -> None:
        if not r.started:
            r.send_error(err)
        elif not r.finished:
            r.abort_stream(err)


def _query(path: bytes) -> dict[str, str]:
    """A request path's query as {name: last value}."""
    from urllib.parse import parse_qsl

    _, _, q = path.decode("latin-1").partition("?")
    return dict(parse_qsl(q, keep_blank_values=True))

