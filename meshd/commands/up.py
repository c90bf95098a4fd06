"""`meshd up`: the embedded default on one machine, in one command.

Starts a local Ray head, the coordinator actors (registry + gateway replicas), and one agent
that launches embedded engine workers (default one prefill, one decode), then serves the
OpenAI API on 127.0.0.1:8000. Prints a warning for each open surface of the config first
(`meshd/surfaces.py`: the default gateway has no API keys; Ray uses token auth and loopback),
then the endpoint, the Ray dashboard URL and a progress line while workers load; Ctrl-C (or
`--duration`) shuts everything down: gateways stop, the agent deregisters, the workers exit,
Ray stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import signal
import time
from typing import Any

import ray

from meshd import raylocal, surfaces
from meshd.commands import CommandError
from meshd.config import MeshConfig
from meshd.coordinator import actors
from meshd.coordinator.gateway import actor as gateways
from meshd.coordinator.store import Store
from meshd.node_agent import daemon, identity
from meshd.node_agent.supervisor import WorkerSupervisor


def _trust_local_agent(cfg: MeshConfig) -> identity.Identity:
    """The operator running `meshd up` owns this host: its agent key is trusted directly."""
    ident = identity.load_or_create(cfg.agent.state_dir)
    store = Store(cfg.coordinator.state_dir)
    try:
        rec = store.key(ident.public_key)
        if rec is None or rec.state != "trusted":
            store.add_key(ident.public_key, ident.node_id, "meshd up local agent")
    finally:
        store.close()
    return ident


def _all_see_workers(handles: list[Any]) -> bool:
    """Does every gateway replica list a model (its routing set holds workers)?"""
    try:
        infos = ray.get([h.info.remote() for h in handles], timeout=5)
    except Exception:  # a replica busy starting: ask again
        return False
    return all(info.get("models") for info in infos)


async def _serve(cfg: MeshConfig, duration: float, dashboard: str) -> None:
    ident = _trust_local_agent(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    box: dict[str, WorkerSupervisor] = {}

    def keep(sup: WorkerSupervisor) -> None:
        box["s"] = sup

    agent = asyncio.create_task(daemon.run(cfg, ident, stop, keep))
    t0 = time.monotonic()
    total = cfg.workers.count
    while not stop.is_set() and not agent.done():
        sup = box.get("s")
        ready = len(sup.ready_workers()) if sup else 0
        print(f"\rloading workers: {ready}/{total} ready ({time.monotonic() - t0:.0f}s)",
              end="", flush=True)
        if ready == total:
            break
        if time.monotonic() - t0 > cfg.workers.ready_timeout_s:
            stop.set()
            raise CommandError(f"workers not ready after {cfg.workers.ready_timeout_s:.0f}s; "
                               f"see {cfg.agent.state_dir}/logs")
        await asyncio.sleep(0.5)
    print()
    if agent.done():
        await agent  # re-raises AgentRefused
    g = cfg.gateway
    url = f"http://{g.host}:{g.port}"
    print(f"starting {g.replicas} gateway replica(s)...", flush=True)
    handles = await asyncio.to_thread(gateways.deploy, g, cfg.ray.namespace, 60.0,
                                      cfg.coordinator.state_dir)
    # every replica sees the workers (the kernel may hand the first request to any of them)
    while not stop.is_set() and not await asyncio.to_thread(_all_see_workers, handles):
        if time.monotonic() - t0 > cfg.workers.ready_timeout_s:
            raise CommandError("the gateway sees no workers; check `meshd status`")
        await asyncio.sleep(0.3)
    print(f"\nmeshd is up: OpenAI API at {url}/v1 (model {cfg.workers.model_name})")
    print(f"  Ray dashboard: {dashboard}")
    print(f"  try: curl {url}/v1/completions -H 'content-type: application/json' "
          f"-d '{{\"model\": \"{cfg.workers.model_name}\", \"prompt\": \"Hello\", "
          f"\"max_tokens\": 8}}'")
    print("  Ctrl-C to stop", flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), duration or None)
    print("\nshutting down...", flush=True)
    await asyncio.to_thread(gateways.stop, cfg.ray.namespace)
    stop.set()
    await asyncio.wait_for(agent, 30)


def run(args: argparse.Namespace, cfg: MeshConfig) -> int:
    w = cfg.workers
    if args.prefill is not None or args.decode is not None or w.count == 0:
        prefill = args.prefill if args.prefill is not None else (w.prefill or 1)
        decode = args.decode if args.decode is not None else (w.decode or 1)
        w = dataclasses.replace(w, prefill=prefill, decode=decode)
    coord = cfg.coordinator
    agent = dataclasses.replace(cfg.agent, coordinator=f"{coord.grpc_host}:{coord.grpc_port}")
    cfg = dataclasses.replace(cfg, workers=w, agent=agent)
    # `up` always starts its own head (ray.address is not used), so its surfaces are meshd's
    surfaces.announce(dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, address="")))
    print("starting Ray (local head)...", flush=True)
    ctx = raylocal.init(cfg.ray, coord.state_dir, "")
    try:
        try:
            _, info = actors.deploy(coord, cfg.ray.namespace)
        except Exception as e:
            raise CommandError(f"coordinator did not start: {e}") from None
        print(f"coordinator: control plane {coord.grpc_host}:{info['grpc_port']}, "
              f"metrics http://{coord.grpc_host}:{info['metrics_port']}/metrics")
        dash = getattr(ctx, "dashboard_url", "") or ""
        asyncio.run(_serve(cfg, args.duration, f"http://{dash}" if dash else "disabled"))
    finally:
        with contextlib.suppress(Exception):
            gateways.stop(cfg.ray.namespace)
        with contextlib.suppress(Exception):
            actors.stop(cfg.ray.namespace)
        ray.shutdown()
    print("stopped")
    return 0
