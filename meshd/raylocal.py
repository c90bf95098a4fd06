"""Ray bootstrap with the auth mode always explicit.

A local `ray.init()` with `RAY_AUTH_MODE` unset silently writes `~/.ray/auth_token`, after which
`ray status` and the dashboard demand it. meshd therefore always sets `RAY_AUTH_MODE` itself
(config `ray.auth_mode`); with `token`, the token lives in meshd's state dir
(`RAY_AUTH_TOKEN_PATH`) and is created there if missing.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

from meshd.config import RayConfig


def auth_env(cfg: RayConfig, state_dir: str) -> dict[str, str]:
    """The environment variables that pin Ray's auth mode (for this process and children)."""
    env = {"RAY_AUTH_MODE": cfg.auth_mode}
    if cfg.auth_mode == "token":
        path = Path(state_dir).expanduser() / "ray_auth_token"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        env["RAY_AUTH_TOKEN_PATH"] = str(path)
    return env


def apply_auth_env(cfg: RayConfig, state_dir: str) -> dict[str, str]:
    env = auth_env(cfg, state_dir)
    os.environ.update(env)
    return env


def init(cfg: RayConfig, state_dir: str, address: str | None = None) -> Any:
    """`ray.init` in this process: join `address` (or cfg.address), else start a local head."""
    import ray

    apply_auth_env(cfg, state_dir)
    addr = cfg.address if address is None else address
    kwargs: dict[str, Any] = {"namespace": cfg.namespace, "log_to_driver": False,
                              "configure_logging": False}
    if addr:
        return ray.init(address=addr, **kwargs)
    if cfg.num_cpus:
        kwargs["num_cpus"] = cfg.num_cpus
    return ray.init(include_dashboard=cfg.include_dashboard, dashboard_host=cfg.dashboard_host,
                    dashboard_port=cfg.dashboard_port, **kwargs)


def start_head(cfg: RayConfig, state_dir: str, port: int = 6379) -> str:
    """Start a Ray head that outlives this process (`ray start --head`); returns its address."""
    exe = shutil.which("ray")
    if exe is None:
        raise RuntimeError("the `ray` command is not on PATH; install meshd's dependencies")
    env = {**os.environ, **auth_env(cfg, state_dir)}
    cmd = [exe, "start", "--head", f"--port={port}", "--disable-usage-stats",
           f"--dashboard-host={cfg.dashboard_host}", f"--dashboard-port={cfg.dashboard_port}",
           f"--include-dashboard={str(cfg.include_dashboard).lower()}"]
    if cfg.num_cpus:
        cmd.append(f"--num-cpus={cfg.num_cpus}")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"`ray start --head` failed:\n{proc.stdout}\n{proc.stderr}")
    return f"127.0.0.1:{port}"


def stop_head(cfg: RayConfig, state_dir: str) -> None:
    exe = shutil.which("ray") or "ray"
    env = {**os.environ, **auth_env(cfg, state_dir)}
    subprocess.run([exe, "stop"], env=env, capture_output=True, timeout=120, check=False)
