"""`meshd up`: a whole local mesh in one command — Ray, the coordinator actors and one agent.

Prints the control-plane endpoint, the Ray dashboard URL and `meshd status`, then runs until
Ctrl-C (or `--duration`), and shuts everything down: the agent deregisters, the actors stop,
Ray stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import signal
import time

import ray

from meshd import raylocal
from meshd.commands import CommandError
from meshd.commands.status import fetch, table
from meshd.config import MeshConfig
from meshd.coordinator import actors
from meshd.node_agent import identity, probe
from meshd.node_agent.agent import Agent


async def _serve(cfg: MeshConfig, duration: float) -> None:
    coord = cfg.coordinator
    address = f"{coord.grpc_host}:{coord.grpc_port}"
    ident = identity.load_or_create(cfg.agent.state_dir)
    admin = identity.load_or_create(coord.state_dir, actors.ADMIN_KEY_FILE)
    # The local agent is trusted by the operator who runs `meshd up` on this host.
    from meshd.coordinator.store import Store

    store = Store(coord.state_dir)
    try:
        rec = store.key(ident.public_key)
        if rec is None or rec.state != "trusted":
            store.add_key(ident.public_key, ident.node_id, "meshd up local agent")
    finally:
        store.close()
    agent_cfg = dataclasses.replace(cfg.agent, coordinator=address)
    agent = Agent(agent_cfg, ident, lambda: probe.probe(attributes=agent_cfg.attributes))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(agent.run(stop))
    deadline = time.monotonic() + 30
    while not agent.status.registered and time.monotonic() < deadline and not task.done():
        print(f"\rwaiting for agent {ident.node_id} to register...", end="", flush=True)
        await asyncio.sleep(0.2)
    print()
    if task.done():
        await task  # re-raises AgentRefused
    print(table(await fetch(address, admin)), flush=True)
    print("meshd is up; Ctrl-C to stop", flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), duration or None)
    stop.set()
    await asyncio.wait_for(task, 10)


def run(args: argparse.Namespace, cfg: MeshConfig) -> int:
    state = cfg.coordinator.state_dir
    print("starting Ray (local head)...", flush=True)
    ctx = raylocal.init(cfg.ray, state, "")
    try:
        try:
            _, info = actors.deploy(cfg.coordinator, cfg.ray.namespace)
        except Exception as e:
            raise CommandError(f"coordinator did not start: {e}") from None
        print(f"coordinator: control plane {cfg.coordinator.grpc_host}:{info['grpc_port']}, "
              f"metrics http://{cfg.coordinator.grpc_host}:{info['metrics_port']}/metrics")
        dash = getattr(ctx, "dashboard_url", "") or ""
        print(f"Ray dashboard: http://{dash}" if dash else "Ray dashboard: disabled")
        asyncio.run(_serve(cfg, args.duration))
    finally:
        print("shutting down...", flush=True)
        with contextlib.suppress(Exception):
            actors.stop(cfg.ray.namespace)
        ray.shutdown()
    print("stopped")
    return 0
