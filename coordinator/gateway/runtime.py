"""One gateway replica, assembled: worker pool, router, lifecycle handler, HTTP server.

`GatewayRuntime` owns an asyncio loop's worth of serving: it keeps the worker pool's
membership current (the registry's routing set via `membership`, plus static workers from the
config, whose models are read from their `/v1/models`), and serves the OpenAI API on the shared
port. Run it on its own event loop (`run_in_thread`) inside the Ray actor, or directly in tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from meshd.capabilities import Worker
from meshd.config import GatewaySettings
from meshd.coordinator.gateway.backend import BackendError, BackendPool
from meshd.coordinator.gateway.config import GatewayConfig
from meshd.coordinator.gateway.health import CacheHealthMonitor
from meshd.coordinator.gateway.mesh import MeshHandler
from meshd.coordinator.gateway.mesh_metrics import MeshMetrics
from meshd.coordinator.gateway.prompts import PromptBuilder
from meshd.coordinator.gateway.server import GatewayServer
from meshd.coordinator.gateway.workers import WorkerPool
from meshd.coordinator.lifecycle import Deadlines
from meshd.scheduler.pd import PDConfig, PDDecider
from meshd.scheduler.prefix_index import IndexSnapshot, PrefixIndex
from meshd.scheduler.profiles import builtin
from meshd.scheduler.router import Router

log = logging.getLogger("meshd.gateway")
Membership = Callable[[], Awaitable[list[tuple[str, Worker]]]]


def make_router(settings: GatewaySettings, index: PrefixIndex) -> Router:
    return Router(decode=builtin("decode"), prefill=builtin("prefill"),
                  pd=PDDecider(PDConfig(min_uncached_tokens=settings.pd_min_uncached_tokens)),
                  index=index)


async def discover_static(entries: Sequence[str], timeout_s: float = 5.0
                          ) -> list[tuple[str, Worker]]:
    """Static workers (`URL` or `ROLE=URL`) with the models their `/v1/models` lists.
    An unreachable one is skipped this round (and retried on the next)."""
    out: list[tuple[str, Worker]] = []
    for i, entry in enumerate(entries):
        role, _, url = entry.rpartition("=")
        pool = BackendPool.from_url(url)
        try:
            r = await pool.request("GET", "/v1/models", timeout=timeout_s)
            models = [m["id"] for m in orjson.loads(r.body).get("data", [])]
        except (BackendError, orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            log.warning("static worker %s: %s", url, e)
            continue
        finally:
            await pool.close()
        for model in models[:1]:
            plain = role == "openai"
            out.append(("static", Worker(f"static-{i}", url.rstrip("/"),
                                         "both" if plain else (role or "both"), model,
                                         engine="openai" if plain else "static")))
    return out


@dataclass
class GatewayRuntime:
    settings: GatewaySettings
    membership: Membership | None = None  # the registry's routing set
    snapshot: bytes | None = None  # a sibling replica's prefix index to start from

    def __post_init__(self) -> None:
        s = self.settings
        # A new replica starts from a sibling's index snapshot plus the event stream: each
        # worker's feed continues at the snapshot's next seq (replaying what came since).
        self.index = (PrefixIndex.restore(IndexSnapshot.from_bytes(self.snapshot))
                      if self.snapshot else PrefixIndex())
        self.health = CacheHealthMonitor(s.hash_seed)
        self.pool = WorkerPool(self.index, scrape_interval_s=s.scrape_interval_s,
                               health=self.health)
        self.metrics = MeshMetrics()
        self.metrics.watch_workers(self.pool)
        self.metrics.watch_health(self.health)
        deadlines = Deadlines(total_s=s.total_timeout_s, prefill_s=s.prefill_timeout_s,
                              first_token_s=s.first_token_timeout_s,
                              inter_token_s=s.inter_token_timeout_s)
        self.handler = MeshHandler(self.pool, make_router(s, self.index),
                                   PromptBuilder(s.tokenizers, s.hash_seed), deadlines,
                                   self.metrics)
        self.handler.on_runs = self.health.observe_runs
        self.server = GatewayServer(
            GatewayConfig(host=s.host, port=s.port, max_body_bytes=s.max_body_bytes,
                          api_keys=tuple(sorted(s.api_keys.items())),
                          handler_timeout=s.total_timeout_s + 5),
            self.handler, registry=self.metrics.registry, models=self.handler.models,
            cache_health=self.health.to_json)
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        members = await self.membership() if self.membership else []
        members += await discover_static(self.settings.static_workers)
        self.pool.update(members)

    async def start(self) -> None:
        await self.refresh()
        for worker_id in self.index.workers():  # snapshot entries of workers gone since
            if worker_id not in self.pool.entries:
                self.index.remove_worker(worker_id)
        await self.pool.start()
        await self.server.start()
        self._task = asyncio.get_running_loop().create_task(self._membership_loop())

    async def _membership_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.membership_interval_s)
            try:
                await self.refresh()
            except Exception:  # keep serving with the last known membership
                log.exception("membership refresh failed")

    async def stop(self, timeout_s: float = 10.0) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.server.shutdown(timeout_s)
        await self.pool.close()

    def index_snapshot(self) -> bytes:
        """This replica's prefix index, for a new sibling (call on the runtime's loop)."""
        return self.index.snapshot().to_bytes()

    def describe(self) -> dict[str, Any]:
        return {"workers": sorted(self.pool.entries), "models": self.pool.models(),
                "port": self.settings.port, "from_snapshot": self.snapshot is not None}


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
