"""`meshd agent`: the node agent daemon (workers, register, heartbeat, leave on SIGTERM)."""

from __future__ import annotations

import argparse
import asyncio
import signal

from meshd.commands import CommandError
from meshd.config import MeshConfig
from meshd.node_agent import daemon, identity
from meshd.node_agent.agent import AgentRefused
from meshd.node_agent.ray_host import HostError


async def serve(cfg: MeshConfig, ident: identity.Identity) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await daemon.run(cfg, ident, stop)


def run(args: argparse.Namespace, cfg: MeshConfig) -> int:
    try:
        ident = identity.load_or_create(cfg.agent.state_dir)
    except identity.IdentityError as e:
        raise CommandError(str(e)) from None
    print(f"meshd agent {ident.node_id} -> coordinator {cfg.agent.coordinator}, "
          f"{cfg.workers.count} worker(s)", flush=True)
    try:
        asyncio.run(serve(cfg, ident))
    except (AgentRefused, HostError) as e:
        raise CommandError(str(e)) from None
    return 0
