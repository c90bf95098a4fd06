"""The embedded engine's worker server: the subset of vLLM's OpenAI server the gateway uses.

    python -m meshd.node_agent.engine.worker_server --port 8000 [--role prefill --kv-secret ...]
    meshd engine serve ...

Routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`,
`GET /metrics`, `GET /debug/kv` (block accounting for tests and operators). Request and
response shapes: `openai_io.py`; disaggregation: `disagg.py`; the contract is written down in
`docs/engine.md`. Prints `meshd engine ready: http://HOST:PORT ...` once it serves; SIGTERM or
SIGINT shut it down gracefully (in-flight requests get up to `SHUTDOWN_GRACE_S`).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import logging
import secrets
import signal
import socket
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, cast

from aiohttp import web

from meshd.api_errors import ApiError
from meshd.kv_transfer.auth import load_authenticator
from meshd.kv_transfer.conn import ServerConfig
from meshd.kv_transfer.lease_quota import LeaseQuota
from meshd.kv_transfer.mux import MuxServer
from meshd.kv_transfer.offering import make_offer, serve_kv
from meshd.kv_transfer.select import HostFacts
from meshd.kv_transfer.transport import KVViews, Peer
from meshd.node_agent.engine.async_engine import AsyncEngine, EngineDeadError, Hooks
from meshd.node_agent.engine.config import EngineConfig, tiny_model, tiny_moe_model
from meshd.node_agent.engine.disagg import DisaggStats, EngineLeases, Puller, block_layout
from meshd.node_agent.engine.engine import Engine
from meshd.node_agent.engine.handlers import CompletionHandler
from meshd.node_agent.engine.kv_publisher import KVEventPublisher, to_u64
from meshd.node_agent.engine.metrics import ServerSnapshot, render
from meshd.node_agent.engine.openai_io import ModelInfo
from meshd.node_agent.engine.worker_config import (
    WorkerConfig,
    add_serve_flags,
    attest_key,
    from_args,
)

log = logging.getLogger(__name__)
SHUTDOWN_GRACE_S = 5.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def engine_config(cfg: WorkerConfig) -> EngineConfig:
    model = tiny_moe_model() if cfg.moe else tiny_model()
    if cfg.max_model_len:
        model = replace(model, max_model_len=cfg.max_model_len)
    return EngineConfig(model=model, model_path=cfg.model_path, seed=cfg.seed,
                        block_size=cfg.block_size, num_blocks=cfg.num_blocks,
                        max_num_seqs=cfg.max_num_seqs, engine_id=cfg.engine_id,
                        enable_kv_events=cfg.kv_events_port is not None)


class WorkerServer:
    """One engine behind HTTP: the step driver, the KV transfer server/puller, KV events."""

    def __init__(self, cfg: WorkerConfig) -> None:
        if not cfg.engine_id:
            cfg = replace(cfg, engine_id=f"meshd-{uuid.uuid4().hex[:12]}")
        # A node key wins over a secret; a random secret only serves role both (validated).
        secret = b"" if cfg.kv_node_key else cfg.kv_secret or secrets.token_bytes(32)
        self.cfg = cfg
        engine = Engine(engine_config(cfg))
        self.stats = DisaggStats()
        self.driver = AsyncEngine(engine, Hooks(
            on_held=lambda rid, blocks: self.leases.grant(rid, blocks),
            on_aborted=lambda rid: self.leases.forget(rid),
            housekeeping=lambda e: self.leases.expire(e),
            on_kv_events=self._publish if cfg.kv_events_port is not None else None))
        kv_config = ServerConfig()  # its transfer deadline bounds a lease's renewal
        self.quota = LeaseQuota(*cfg.lease_bounds)
        self.leases = EngineLeases(self.driver, cfg.lease_timeout_s,
                                   kv_config.transfer_timeout_s, on_end=self.quota.end)
        auth = load_authenticator(secret=secret, node_key_file=cfg.kv_node_key,
                                  trusted_keys_file=cfg.kv_trusted_keys, node_id=cfg.engine_id)
        self.kv_server: MuxServer | None = None
        self.kv_peer = Peer("", 0)
        # This host as the transport pick sees it, and what a prefill side here serves (its
        # `params` are what prefill responses carry).
        self.kv_facts = HostFacts(socket.gethostname(), cfg.kv_advertise_host)
        self.kv_offer = make_offer(cfg.kv_transfer, "cpu", self.kv_facts)
        if cfg.role in ("prefill", "both"):
            views = KVViews(engine.kv_caches, block_layout(engine.layout))
            serving = serve_kv(self.kv_offer, views, auth, self.leases.table,
                               Peer(cfg.bind_kv_host, cfg.kv_port), config=kv_config)
            self.kv_server, self.kv_peer = serving.server, serving.peer(cfg.kv_advertise_host)
        self.puller = (Puller(self.driver, auth, self.kv_offer.default, cfg.pull_timeout_s,
                              self.stats, self.kv_facts)
                       if cfg.role in ("decode", "both") else None)
        self.publisher: KVEventPublisher | None = None
        if cfg.kv_events_port is not None:
            host = "*" if cfg.host in ("0.0.0.0", "") else cfg.host
            replay = (f"tcp://{host}:{cfg.kv_replay_port}" if cfg.kv_replay_port is not None
                      else None)
            # hashes only unless asked (the gateway needs no prompt text), over CURVE keyed
            # by the worker's API key when it has one: only the mesh's gateways subscribe
            self.publisher = KVEventPublisher(f"tcp://{host}:{cfg.kv_events_port}", replay,
                                              curve_token=cfg.api_key,
                                              token_ids=cfg.kv_events_token_ids)
        m = engine.model_config
        self.info = ModelInfo(cfg.model_name, engine.tokenizer, m.max_model_len,
                              cfg.num_blocks * cfg.block_size, m.vocab_size)
        self.attest_key = attest_key(cfg.attest_key) if cfg.attest_key else None
        self.handler = CompletionHandler(self)

    def _publish(self, events: list[Any]) -> None:
        if self.publisher is not None:
            self.publisher.publish(events)

    def app(self) -> web.Application:
        middlewares: list[Any] = [error_middleware]
        if self.cfg.api_key:
            middlewares.append(bearer_middleware(self.cfg.api_key))
        else:
            log.warning("no --api-key-file: this worker serves anyone who reaches %s:%d "
                        "(the agent always sets one)", self.cfg.host, self.cfg.port)
        app = web.Application(middlewares=middlewares)
        app.router.add_post("/v1/completions", self.handler.completions)
        app.router.add_post("/v1/chat/completions", self.handler.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/debug/kv", self.debug_kv)
        return app

    async def close(self) -> None:
        await self.driver.shutdown()
        if self.kv_server is not None:
            self.kv_server.close()
        if self.puller is not None:
            self.puller.close()
        if self.publisher is not None:
            self.publisher.close()

    # -- plain routes --------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{
            "id": self.info.name, "object": "model", "created": 0, "owned_by": "meshd",
            "root": self.cfg.model_path or self.info.name, "parent": None,
            "max_model_len": self.info.max_model_len}]})

    async def health(self, request: web.Request) -> web.Response:
        if self.driver.dead is not None:
            raise ApiError(503, f"engine failed: {self.driver.dead}",
                           err_type="ServiceUnavailable")
        return web.Response(status=200)

    async def metrics(self, request: web.Request) -> web.Response:
        snap = ServerSnapshot(
            leases_held=len(self.leases),
            leases=self.leases.stats(),
            kv_server=cast(Any, self.kv_server).stats.snapshot() if self.kv_server else {},
            events_published=self.publisher.published if self.publisher else 0,
            events_dropped=self.publisher.dropped if self.publisher else 0,
            lease_quota=self.quota.snapshot())
        body = render(self.info.name, self.driver.stats, self.stats, snap)
        return web.Response(text=body, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def debug_kv(self, request: web.Request) -> web.Response:
        def look(e: Engine) -> dict[str, Any]:
            try:
                e.blocks.check_integrity()
                integrity = "ok"
            except AssertionError as exc:
                integrity = str(exc)
            hashes = [e.blocks.block_hash(b) for b in range(e.config.num_blocks)]
            return {"num_blocks": e.config.num_blocks, "free_blocks": e.blocks.num_free_blocks,
                    "held": e.stats().num_held, "integrity": integrity,
                    "cached_block_hashes": sorted(to_u64(h) for h in hashes if h is not None)}

        out = await self.driver.call(look)
        out["leases"] = len(self.leases)
        out["lease_quota"] = self.quota.snapshot()
        return web.json_response(out)


GUARDED = ("/v1/", "/debug/")  # serving and debug routes; /health and /metrics stay open


def bearer_middleware(api_key: str) -> Callable[[web.Request, Handler],
                                                Awaitable[web.StreamResponse]]:
    """Serving calls must carry `Authorization: Bearer <api_key>` (what vLLM's `--api-key`
    checks, so the gateway speaks one scheme to both); else 401, OpenAI-shaped. Runs inside
    `error_middleware`."""
    want = hashlib.sha256(api_key.encode()).digest()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(GUARDED):
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            got = hashlib.sha256(token.strip().encode()).digest()
            if scheme.lower() != "bearer" or not hmac.compare_digest(got, want):
                raise ApiError(401, "This worker serves only its mesh's gateways: send "
                               "Authorization: Bearer <the node's worker token>.",
                               err_type="authentication_error", code="invalid_api_key")
        return await handler(request)

    return check


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as an OpenAI-shaped error; never a traceback."""
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e)
    except EngineDeadError as e:
        return error_response(ApiError(503, str(e), err_type="ServiceUnavailable"))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(ApiError(e.status, e.reason, err_type="NotFoundError"
                                       if e.status == 404 else "invalid_request_error"))
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(ApiError(500, "internal server error",
                                       err_type="InternalServerError"))


def error_response(e: ApiError) -> web.Response:
    headers = {"Retry-After": str(max(1, round(e.retry_after)))} if e.retry_after else None
    return web.Response(body=e.body(), status=e.status, content_type="application/json",
                        headers=headers)


async def serve(cfg: WorkerConfig, stop: asyncio.Event | None = None) -> None:
    """Run until `stop` is set (or SIGTERM/SIGINT when `stop` is None)."""
    server = WorkerServer(cfg)
    server.driver.start()
    runner = web.AppRunner(server.app(), handler_cancellation=True,
                           shutdown_timeout=SHUTDOWN_GRACE_S, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    await site.start()
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    host, port = runner.addresses[0][:2]
    kv = f" kv={cfg.kv_transfer}://{server.kv_peer.host}:{server.kv_peer.port}" \
        if server.kv_server else ""
    pub = server.publisher
    ev = f" events={pub.endpoint}" if pub else ""
    ev += f" replay={pub.replay_endpoint}" if pub and pub.replay_endpoint else ""
    print(f"meshd engine ready: http://{host}:{port} model={server.info.name} "
          f"role={cfg.role} engine_id={server.cfg.engine_id}{kv}{ev}", flush=True)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await runner.cleanup()
        await server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshd engine serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_flags(p)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = from_args(args)
    except ValueError as e:
        print(f"meshd engine: {e}", file=sys.stderr)
        return 2
    asyncio.run(serve(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())

