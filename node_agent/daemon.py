"""The agent daemon's composition: supervised workers + the control-plane loop.

Workers from `[workers]` are started first; the agent registers right away and registers again
whenever the set of *ready* workers changes, so the gateway routes to a worker only once it
answers its health check. On stop the agent deregisters, then the workers are terminated.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from meshd.config import MeshConfig
from meshd.node_agent import probe
from meshd.node_agent.agent import Agent
from meshd.node_agent.identity import Identity
from meshd.node_agent.launcher import SECRET_FILE, embedded_specs, ensure_secret
from meshd.node_agent.supervisor import Supervisor


def make_supervisor(cfg: MeshConfig, ident: Identity) -> Supervisor:
    state = Path(cfg.agent.state_dir).expanduser()
    w = cfg.workers
    specs = []
    if w.count:
        secret = ensure_secret(w.kv_secret_file or state / SECRET_FILE)
        specs = embedded_specs(w, ident.node_id, cfg.agent.host or "127.0.0.1", secret)
    return Supervisor(specs, state / "logs")


async def run(cfg: MeshConfig, ident: Identity, stop: asyncio.Event,
              on_supervisor: Callable[[Supervisor], None] | None = None) -> None:
    """Serve until `stop` is set (raises AgentRefused if the coordinator refuses this node)."""
    sup = make_supervisor(cfg, ident)
    if on_supervisor:
        on_supervisor(sup)
    a = cfg.agent
    agent = Agent(a, ident, lambda: probe.probe(address=a.host, attributes=a.attributes),
                  workers=sup.ready_workers)
    await sup.start()
    try:
        await agent.run(stop)
    finally:
        await sup.stop()
