"""The gRPC edge of the control plane, plus the registry's Prometheus endpoint.

Handlers take raw bytes (no generated deserializer) and map every refusal to a gRPC status with
a detail naming the failed check; the reason also travels as trailing metadata
`meshd-reject-reason` and is counted in `meshd_rejections{reason,method}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import start_http_server

from meshd.config import CoordinatorConfig
from meshd.coordinator.control import ControlPlane, RequestError
from meshd.coordinator.metrics import ControlMetrics
from meshd.coordinator.store import Store
from meshd.coordinator.verify import REASONS, Rejected
from meshd.envelope import REASON_KEY, SERVICE

log = logging.getLogger("meshd.coordinator")


class ControlServer:
    """Owns the gRPC server, the metrics HTTP server and the liveness sweeper."""

    def __init__(self, config: CoordinatorConfig, store: Store, metrics: ControlMetrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.metrics = metrics
        self.plane = ControlPlane(config, store, metrics, clock)
        self._server: grpc.aio.Server | None = None
        self._http: Any = None
        self._sweeper: asyncio.Task[None] | None = None
        self.grpc_port = 0
        self.metrics_port = 0

    async def start(self) -> tuple[int, int]:
        limit = self.config.max_message_bytes
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", 4 * limit),
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.so_reuseport", 0),
        ])
        p = self.plane
        handlers = {
            "Register": self._unary("Register", p.register),
            "Heartbeat": self._unary("Heartbeat", _awaitable(p.heartbeat)),
            "Deregister": self._unary("Deregister", lambda raw, _: p.deregister(raw)),
            "Status": self._unary("Status", _awaitable(p.status)),
            "SetRole": self._unary("SetRole", _awaitable(p.set_role)),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.grpc_port = server.add_insecure_port(self.config.address)
        if self.grpc_port == 0:
            raise OSError(f"cannot bind the control plane to {self.config.address}")
        await server.start()
        self._server = server
        self._http, _ = start_http_server(self.config.metrics_port, self.config.grpc_host,
                                          registry=self.metrics.registry)
        self.metrics_port = int(self._http.server_port)
        self._sweeper = asyncio.create_task(self._sweep_loop())
        log.info("control plane on %s:%d, metrics on :%d", self.config.grpc_host,
                 self.grpc_port, self.metrics_port)
        return self.grpc_port, self.metrics_port

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._sweeper:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server:
            await self._server.stop(grace_s)
        if self._http:
            self._http.shutdown()
            self._http.server_close()
        await self.plane.flush()

    async def _sweep_loop(self) -> None:
        period = min(1.0, self.config.suspect_after_s / 4)
        while True:
            await asyncio.sleep(period)
            try:
                await self.plane.sweep()
            except Exception:  # keep sweeping; a failed flush is retried next round
                log.exception("liveness sweep failed")

    def _unary(self, method: str, fn: Callable[[bytes, str], Awaitable[Any]]
               ) -> grpc.RpcMethodHandler:
        """`fn(raw request bytes, the gRPC peer)`."""
        metrics = self.metrics

        async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            t0 = time.perf_counter()
            try:
                return await fn(raw, context.peer())
            except Rejected as e:
                metrics.rejected(e.reason, method)
                await _abort(context, REASONS[e.reason], e.reason, e.detail)
            except RequestError as e:
                metrics.rejected(e.reason, method)
                await _abort(context, e.code, e.reason, e.detail)
            finally:
                metrics.handle_seconds.labels(method).observe(time.perf_counter() - t0)

        return grpc.unary_unary_rpc_method_handler(
            handle, request_deserializer=None,
            response_serializer=lambda m: m.SerializeToString())


async def _abort(context: grpc.aio.ServicerContext, code: str, reason: str, detail: str) -> None:
    context.set_trailing_metadata(((REASON_KEY, reason),))
    await context.abort(getattr(grpc.StatusCode, code), f"{reason}: {detail}")


def _awaitable(fn: Callable[[bytes], Any]) -> Callable[[bytes, str], Awaitable[Any]]:
    async def call(raw: bytes, peer: str) -> Any:
        return fn(raw)

    return call
