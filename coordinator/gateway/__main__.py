"""`python -m meshd.coordinator.gateway --backend http://127.0.0.1:9000 --port 8000`

Runs one gateway replica with the round-robin `ProxyHandler` on uvloop; with `--mesh`, the
full mesh path instead (`GatewayRuntime`: prompts tokenized and hashed at the edge, routing,
the request lifecycle) with the backends as static vLLM-protocol workers. Start several with
the same `--port` to share it (SO_REUSEPORT); SIGTERM/SIGINT drain gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal

from meshd.coordinator.gateway.config import GatewayConfig
from meshd.coordinator.gateway.http.server import GatewayServer
from meshd.coordinator.gateway.serving.proxy import ProxyHandler
from meshd.coordinator.gateway.workers.client import BackendPool


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m meshd.coordinator.gateway")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--backend", action="append", required=True, help="http://host:port")
    ap.add_argument("--model", action="append", default=[])
    ap.add_argument("--api-key", action="append", default=[], help="tenant=key")
    ap.add_argument("--max-connections", type=int, default=512, help="per backend")
    ap.add_argument("--mesh", action="store_true", help="the mesh handler, not the proxy")
    ap.add_argument("--config", help="a meshd TOML file: its [gateway] tables (governance, "
                    "routing, limits...) under the flags above")
    return ap.parse_args(argv)


def _config(ns: argparse.Namespace) -> GatewayConfig:
    base = GatewayConfig()
    if ns.config:
        from meshd.config import load

        base = load(ns.config, environ={}).gateway
    keys = {**base.api_keys, **dict(s.split("=", 1) for s in ns.api_key)}
    return dataclasses.replace(base, host=ns.host, port=ns.port,
                               static_workers=tuple(ns.backend), api_keys=keys)


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve_mesh(ns: argparse.Namespace) -> None:
    from meshd.coordinator.gateway.runtime import GatewayRuntime

    rt = GatewayRuntime(_config(ns))
    await rt.start()
    print(f"meshd gateway (mesh) listening on {ns.host}:{ns.port}", flush=True)
    await _until_signalled()
    await rt.stop()


async def serve(ns: argparse.Namespace) -> None:
    from meshd.coordinator.gateway.runtime import tune_gc

    tune_gc()  # this process is one replica
    if ns.mesh:
        await serve_mesh(ns)
        return
    pools = [BackendPool.from_url(u, max_connections=ns.max_connections) for u in ns.backend]
    handler = ProxyHandler(pools, ns.model)
    server = GatewayServer(_config(ns), handler, models=handler.models)
    await server.start()
    print(f"meshd gateway listening on {ns.host}:{server.port}", flush=True)
    await _until_signalled()
    await server.shutdown()
    await handler.close()


def main(argv: list[str] | None = None) -> None:
    ns = _args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; fall back anyway
        asyncio.run(serve(ns))
    else:
        uvloop.run(serve(ns))


if __name__ == "__main__":
    main()
