"""Ray bootstrap: the auth mode always explicit, a head meshd starts on loopback unless configured.

Auth. A local `ray.init()` with `RAY_AUTH_MODE` unset silently writes `~/.ray/auth_token`, after
which `ray status` and the dashboard demand it. meshd therefore always sets `RAY_AUTH_MODE`
itself (config `ray.auth_mode`, default `token`); with `token`, the token lives in meshd's state
dir (`<state_dir>/ray_auth_token`, exported as `RAY_AUTH_TOKEN_PATH`) and is created there if
missing. With token auth, Ray's gRPC ports and its HTTP servers (the dashboard, whose Jobs API
runs shell commands, and the dashboard agent) refuse a caller without the token (401 / 403).
Ray reads these variables when it is imported, so after setting them meshd refreshes Ray's
cached config in this process (`_refresh_ray`).

Bind address (Ray 2.60, checked with `ss -ltnp`). Ray binds its own ports -- GCS, raylet (node
manager, object manager), core workers, dashboard agent, runtime-env agent, metrics export,
Ray Client server -- to the node address when that address is a loopback one, and to every
interface (0.0.0.0) otherwise. It also rewrites a loopback node address (`--node-ip-address`,
`_node_ip_address`, `127.0.0.1` in a join address) to the host's external IP, unless
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`: Ray's single-host mode, its default on macOS and
Windows. So for `ray.bind_host` on loopback meshd sets that variable for the head's processes
and for itself, and a process that joins a loopback head needs it too (meshd's own commands set
it; for Ray's CLI: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray status --address 127.0.0.1:6379`).
The dashboard listens on `ray.dashboard_host` on its own (loopback by default).
"""

from __future__ import annotations

import importlib
import logging
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from meshd.config import RayConfig
from meshd.endpoints import is_loopback

log = logging.getLogger(__name__)

SINGLE_HOST_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps a loopback node address
TOKEN_FILE = "ray_auth_token"
_WILDCARD = ("0.0.0.0", "::")


def token_path(state_dir: str) -> Path:
    return Path(state_dir).expanduser() / TOKEN_FILE


def auth_env(cfg: RayConfig, state_dir: str) -> dict[str, str]:
    """The environment variables that pin Ray's auth mode (for this process and children)."""
    env = {"RAY_AUTH_MODE": cfg.auth_mode}
    if cfg.auth_mode == "token":
        path = token_path(state_dir)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        env["RAY_AUTH_TOKEN_PATH"] = str(path)
    return env


def bind_env(cfg: RayConfig) -> dict[str, str]:
    """The environment a head meshd starts needs for `cfg.bind_host` (see the module doc)."""
    return {SINGLE_HOST_VAR: "0"} if is_loopback(cfg.bind_host) else {}


def node_address(cfg: RayConfig) -> str | None:
    """The node address to give a head meshd starts (None: Ray picks one, on 0.0.0.0 / ::)."""
    return None if cfg.bind_host in _WILDCARD else cfg.bind_host


def head_address(cfg: RayConfig, port: int) -> str:
    """Where this host reaches the GCS of a head meshd started with `cfg`."""
    host = cfg.bind_host
    if is_loopback(host) or host in _WILDCARD:
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def apply_auth_env(cfg: RayConfig, state_dir: str) -> dict[str, str]:
    env = auth_env(cfg, state_dir)
    os.environ.update(env)
    _refresh_ray()
    return env


def _refresh_ray() -> None:
    """Make an already imported Ray see the `RAY_*` variables set since (Ray reads them at
    import: its cached config holds the auth mode, `ray_constants` the single-host switch)."""
    if "ray" not in sys.modules:
        return
    import ray

    if ray.is_initialized():
        return
    from ray._private import ray_constants

    raylet: Any = importlib.import_module("ray._raylet")  # a compiled module, untyped
    raylet.Config.initialize("")
    raylet.AuthenticationTokenLoader.instance().reset_cache()
    if os.environ.get(SINGLE_HOST_VAR) == "0" and hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        ray_constants.ENABLE_RAY_CLUSTER = False


def _join_host(address: str) -> str:
    """The GCS host that `ray.init(address=...)` will connect to ("" if unknown)."""
    if address.startswith("ray://"):
        return ""
    try:
        from ray._private import services

        address = services.get_ray_address_from_environment(address, None) or address
    except Exception:  # no cluster found (ray.init reports it) or a malformed address
        pass
    host, sep, _ = address.rpartition(":")
    return host.strip("[]") if sep else ""


def init(cfg: RayConfig, state_dir: str, address: str | None = None) -> Any:
    """`ray.init` in this process: join `address` (or cfg.address), else start a local head
    whose ports listen on `cfg.bind_host`."""
    import ray

    addr = cfg.address if address is None else address
    single_host = is_loopback(_join_host(addr)) if addr else bool(bind_env(cfg))
    if single_host:  # a loopback head, ours or the one we join
        os.environ[SINGLE_HOST_VAR] = "0"
    fresh = cfg.auth_mode == "token" and not token_path(state_dir).exists()
    apply_auth_env(cfg, state_dir)
    kwargs: dict[str, Any] = {"namespace": cfg.namespace, "log_to_driver": False,
                              "configure_logging": False}
    if addr:
        try:
            return ray.init(address=addr, **kwargs)
        except (ConnectionError, ray.exceptions.AuthenticationError) as e:
            if not fresh and not isinstance(e, ray.exceptions.AuthenticationError):
                raise
            made = ", created just now" if fresh else ""
            raise ConnectionError(
                f"{e} -- with ray.auth_mode = 'token' meshd sends the Ray token in "
                f"{token_path(state_dir)}{made}; if that cluster uses token auth, copy its "
                f"token there (`{TOKEN_FILE}` in the state dir of the meshd that started the "
                f"head)") from e
    if cfg.num_cpus:
        kwargs["num_cpus"] = cfg.num_cpus
    node = node_address(cfg)
    if node is not None:
        kwargs["_node_ip_address"] = node
    # "local": a new head even when `ray start` left a cluster address in Ray's temp dir
    ctx: Any = ray.init(address="local", include_dashboard=cfg.include_dashboard,
                        dashboard_host=cfg.dashboard_host, dashboard_port=cfg.dashboard_port,
                        **kwargs)
    got = str(ctx.address_info.get("node_ip_address", ""))
    if is_loopback(cfg.bind_host) and not is_loopback(got):
        log.warning("ray.bind_host is %s but Ray's node address is %s: Ray's ports listen on "
                    "every interface", cfg.bind_host, got)
    return ctx


def start_head(cfg: RayConfig, state_dir: str, port: int = 6379) -> str:
    """Start a Ray head that outlives this process (`ray start --head`), its ports on
    `cfg.bind_host`; returns the address this host reaches it at."""
    exe = shutil.which("ray")
    if exe is None:
        raise RuntimeError("the `ray` command is not on PATH; install meshd's dependencies")
    env = {**os.environ, **auth_env(cfg, state_dir), **bind_env(cfg)}
    cmd = [exe, "start", "--head", f"--port={port}", "--disable-usage-stats",
           f"--dashboard-host={cfg.dashboard_host}", f"--dashboard-port={cfg.dashboard_port}",
           f"--include-dashboard={str(cfg.include_dashboard).lower()}"]
    node = node_address(cfg)
    if node is not None:
        cmd.append(f"--node-ip-address={node}")
    if cfg.num_cpus:
        cmd.append(f"--num-cpus={cfg.num_cpus}")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"`ray start --head` failed:\n{proc.stdout}\n{proc.stderr}")
    return head_address(cfg, port)


def stop_head(cfg: RayConfig, state_dir: str) -> None:
    exe = shutil.which("ray") or "ray"
    env = {**os.environ, **auth_env(cfg, state_dir)}
    subprocess.run([exe, "stop"], env=env, capture_output=True, timeout=120, check=False)
