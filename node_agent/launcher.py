"""From the agent's `[workers]` config to supervised worker processes.

Embedded workers run `python -m meshd engine serve ...` (meshd's CPU engine, which speaks vLLM's
worker protocol). All workers of one mesh share a KV-transfer secret file (mode 0600) so a
decode worker can pull from any prefill worker; `meshd up` puts it in the agent's state dir.
An MoE placement (`[workers] experts`) becomes the report's expert records (`embedded_experts`).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import sys
from pathlib import Path

from meshd.capabilities import Experts, Worker
from meshd.config import WorkersConfig, parse_experts
from meshd.node_agent.engine.worker_config import first_line
from meshd.node_agent.supervisor import WorkerSpec

SECRET_FILE = "kv_secret"
# The node's worker token: the bearer token its workers' serving APIs demand (one per node,
# reported with its workers in the signed capability report, so only the gateways learn it).
TOKEN_FILE = "worker_token"


def ensure_secret(path: str | Path) -> Path:
    """Create a secret file (32 random bytes, hex, mode 0600) if missing: the shared
    KV-transfer secret, or the node's worker token."""
    p = Path(path).expanduser()
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    return p


def roles(cfg: WorkersConfig) -> list[str]:
    return ["prefill"] * cfg.prefill + ["decode"] * cfg.decode + ["both"] * cfg.both


def respec(spec: WorkerSpec, role: str) -> WorkerSpec | None:
    """A worker's spec in another role, under the id that role gives its slot (`<node>-p0` as
    decode is `<node>-d0`: a new worker to the gateways, with a fresh cache view): an
    embedded worker's `--role`, a vLLM worker's KV role (`vllm_launcher.respec`); None when
    its engine cannot change roles."""
    w = spec.worker
    if w.engine == "vllm":
        from meshd.node_agent import vllm_launcher

        return vllm_launcher.respec(spec, role)
    if w.engine != "embedded" or "--role" not in spec.argv:
        return None
    node, _, slot = w.worker_id.rpartition("-")
    new_id = f"{node}-{role[0]}{slot[1:]}"
    argv = list(spec.argv)
    argv[argv.index("--role") + 1] = role
    if "--engine-id" in argv:
        argv[argv.index("--engine-id") + 1] = new_id
    return dataclasses.replace(spec, worker=dataclasses.replace(w, worker_id=new_id,
                                                                 role=role),
                               argv=tuple(argv))


def worker_ids(cfg: WorkersConfig, node_id: str) -> list[str]:
    """The embedded workers' ids, in launch order (`<node>-<p|d|b><i>`)."""
    return [f"{node_id}-{role[0]}{i}" for i, role in enumerate(roles(cfg))]


def embedded_experts(cfg: WorkersConfig, node_id: str) -> tuple[Experts, ...]:
    """The expert placement of `[workers] experts` as capability-report records: one per
    MoE layer for each worker with an explicit set (a `*` worker hosts all: no record).
    Validated against the model as an `ExpertPlacement` (ids in range, every expert hosted
    somewhere); raises ValueError naming `workers.experts`."""
    if not cfg.experts:
        return ()
    from meshd.node_agent.engine.config import model_config_from_hf, tiny_moe_model
    from meshd.scheduler.moe import ExpertPlacement

    model = model_config_from_hf(cfg.model_path) if cfg.model_path else tiny_moe_model()
    if not model.is_moe:
        raise ValueError(f"workers.experts: the model {model.name!r} has no experts")
    ids = worker_ids(cfg, node_id)
    sets = {wid: parse_experts(spec) for wid, spec in zip(ids, cfg.experts, strict=True)}
    try:
        placement = ExpertPlacement.from_worker_sets(
            model.num_experts, {w: range(model.num_experts) if s is None else s
                                for w, s in sets.items()}, model.num_layers)
    except ValueError as e:
        raise ValueError(f"workers.experts: {e}") from None
    out = []
    for layer in range(model.num_layers):
        hosted = placement.worker_experts(layer)
        out += [Experts(cfg.model_name, wid, layer, tuple(sorted(hosted[wid])))
                for wid in ids if sets[wid] is not None]
    return tuple(out)


def embedded_specs(cfg: WorkersConfig, node_id: str, host: str, secret_file: str | Path,
                   token_file: str | Path | None = None, key_file: str | Path | None = None
                   ) -> list[WorkerSpec]:
    """One spec per configured embedded worker; `host` is the address workers bind and report;
    `token_file`: the node's worker token (the workers demand it, the report carries it);
    `key_file`: the node's key, which the workers sign their outputs with (receipts)."""
    token = first_line(str(token_file), "worker token file") if token_file else ""
    specs = []
    for i, (role, worker_id) in enumerate(zip(roles(cfg), worker_ids(cfg, node_id),
                                              strict=True)):
        base = cfg.base_port + 10 * i
        http, kv, events, replay = base, base + 1, base + 2, base + 3
        argv = [sys.executable, "-m", "meshd", "engine", "serve", "--host", host,
                "--port", str(http), "--model-name", cfg.model_name, "--role", role,
                "--block-size", str(cfg.block_size), "--num-blocks", str(cfg.num_blocks),
                "--kv-transfer", cfg.kv_transfer, "--kv-port", str(kv),
                "--kv-events-port", str(events), "--kv-replay-port", str(replay),
                "--kv-secret-file", str(secret_file), "--engine-id", worker_id,
                "--lease-timeout-s", str(cfg.lease_timeout_s)]
        if token_file:
            argv += ["--api-key-file", str(token_file)]
        if key_file:
            argv += ["--attest-key-file", str(key_file)]
        if cfg.model_path:
            argv += ["--model-path", cfg.model_path]
        if cfg.moe:
            argv.append("--moe")
        worker = Worker(worker_id=worker_id, endpoint=f"http://{host}:{http}", role=role,
                        model=cfg.model_name, engine="embedded", kv_block_size=cfg.block_size,
                        kv_capacity_blocks=cfg.num_blocks,
                        kv_events_endpoint=f"tcp://{host}:{events}",
                        kv_events_replay_endpoint=f"tcp://{host}:{replay}",
                        kv_transfer_endpoint=f"{cfg.kv_transfer}://{host}:{kv}",
                        api_token=token)
        specs.append(WorkerSpec(worker, tuple(argv), f"http://{host}:{http}/health",
                                ready_timeout_s=cfg.ready_timeout_s))
    return specs
