"""From the agent's `[workers]` config to supervised worker processes.

Embedded workers run `python -m meshd engine serve ...` (meshd's CPU engine, which speaks vLLM's
worker protocol). All workers of one mesh share a KV-transfer secret file (mode 0600) so a
decode worker can pull from any prefill worker; `meshd up` puts it in the agent's state dir.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from meshd.capabilities import Worker
from meshd.config import WorkersConfig
from meshd.node_agent.supervisor import WorkerSpec

SECRET_FILE = "kv_secret"


def ensure_secret(path: str | Path) -> Path:
    """Create the shared KV-transfer secret (32 random bytes, hex, mode 0600) if missing."""
    p = Path(path).expanduser()
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    return p


def roles(cfg: WorkersConfig) -> list[str]:
    return ["prefill"] * cfg.prefill + ["decode"] * cfg.decode + ["both"] * cfg.both


def embedded_specs(cfg: WorkersConfig, node_id: str, host: str, secret_file: str | Path
                   ) -> list[WorkerSpec]:
    """One spec per configured embedded worker; `host` is the address workers bind and report."""
    specs = []
    for i, role in enumerate(roles(cfg)):
        base = cfg.base_port + 10 * i
        http, kv, events, replay = base, base + 1, base + 2, base + 3
        worker_id = f"{node_id}-{role[0]}{i}"
        argv = [sys.executable, "-m", "meshd", "engine", "serve", "--host", host,
                "--port", str(http), "--model-name", cfg.model_name, "--role", role,
                "--block-size", str(cfg.block_size), "--num-blocks", str(cfg.num_blocks),
                "--kv-transfer", cfg.kv_transfer, "--kv-port", str(kv),
                "--kv-events-port", str(events), "--kv-replay-port", str(replay),
                "--kv-secret-file", str(secret_file), "--engine-id", worker_id,
                "--lease-timeout-s", str(cfg.lease_timeout_s)]
        if cfg.model_path:
            argv += ["--model-path", cfg.model_path]
        if cfg.moe:
            argv.append("--moe")
        worker = Worker(worker_id=worker_id, endpoint=f"http://{host}:{http}", role=role,
                        model=cfg.model_name, engine="embedded", kv_block_size=cfg.block_size,
                        kv_capacity_blocks=cfg.num_blocks,
                        kv_events_endpoint=f"tcp://{host}:{events}",
                        kv_events_replay_endpoint=f"tcp://{host}:{replay}",
                        kv_transfer_endpoint=f"{cfg.kv_transfer}://{host}:{kv}")
        specs.append(WorkerSpec(worker, tuple(argv), f"http://{host}:{http}/health",
                                ready_timeout_s=cfg.ready_timeout_s))
    return specs
