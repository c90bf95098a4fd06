"""The open surfaces a config leaves: one warning sentence each, for `meshd up` and `meshd
coordinator start` to print at start (pure: no I/O but `announce`).

The defaults are the safe choice (Ray token auth, Ray's ports and the dashboard on loopback, the
gateway on loopback); what they cannot close -- a gateway with no API keys -- is still reported.
Each sentence names the config field (and its `MESHD_*` variable) that closes the surface.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from meshd.config import MeshConfig
from meshd.endpoints import is_loopback
from meshd.env import var_name

log = logging.getLogger(__name__)

_WILDCARD = ("", "0.0.0.0", "::")


def _where(host: str, port: int) -> str:
    if host in _WILDCARD:
        return f"every interface (port {port})"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _field(section: str, name: str, value: str) -> str:
    """`[ray] auth_mode = 'token' (MESHD_RAY_AUTH_MODE=token)`."""
    return f"[{section}] {name} = '{value}' ({var_name(section, name)}={value})"


def open_surfaces(cfg: MeshConfig) -> list[str]:
    """One warning per open surface of `cfg`. A head is started by meshd when `ray.address` is
    "" (`meshd up` always starts one: pass its config with the address cleared); only then
    are the dashboard and Ray's ports meshd's to report."""
    out: list[str] = []
    r, g = cfg.ray, cfg.gateway
    head = not r.address
    no_auth = r.auth_mode == "disabled"
    if no_auth and head:
        out.append("Ray token auth is off (ray.auth_mode = 'disabled'): anyone who can reach "
                   "the Ray head's ports or its dashboard can run any command on this host as "
                   "this user (the Jobs API takes shell commands); set "
                   + _field("ray", "auth_mode", "token"))
    elif no_auth:
        out.append(f"Ray token auth is off (ray.auth_mode = 'disabled'): meshd joins the Ray "
                   f"cluster at {r.address} without a token, so that cluster runs code for "
                   f"anyone who reaches its ports; enable token auth there and set "
                   + _field("ray", "auth_mode", "token"))
    if head and r.include_dashboard and not is_loopback(r.dashboard_host):
        where = _where(r.dashboard_host, r.dashboard_port)
        close = (_field("ray", "dashboard_host", "127.0.0.1")
                 + f" or [ray] include_dashboard = false ({var_name('ray', 'include_dashboard')}"
                 "=false)")
        if no_auth:
            out.append(f"the Ray dashboard and its Jobs API listen on {where} with no auth "
                       f"(ray.dashboard_host = '{r.dashboard_host}'): anyone who reaches it can "
                       f"submit a job that runs shell commands on this host; set {close}")
        else:
            out.append(f"the Ray dashboard and its Jobs API listen on {where} (ray."
                       f"dashboard_host = '{r.dashboard_host}'), reachable from the network; "
                       f"a request needs the Ray token, but unless remote access is intended "
                       f"set {close}")
    if head and not is_loopback(r.bind_host):
        risk = (", and with ray.auth_mode = 'disabled' anyone who reaches them can run code on "
                "this host" if no_auth else "")
        out.append(f"Ray's own ports (GCS, raylet, object manager, workers, dashboard agent, "
                   f"metrics) listen on every interface (ray.bind_host = '{r.bind_host}': Ray "
                   f"binds them to 0.0.0.0 whenever its node address is not loopback){risk}; "
                   f"unless Ray nodes on other hosts join this head, set "
                   + _field("ray", "bind_host", "127.0.0.1"))
    if g.replicas and not g.api_keys:
        keys = (f"[gateway] api_keys = {{ tenant = \"key\" }} "
                f"({var_name('gateway', 'api_keys')}=tenant=key)")
        if is_loopback(g.host):
            out.append(f"the OpenAI gateway at http://{_where(g.host, g.port)} has no API keys: "
                       f"any user or process on this host can use the mesh and spend its "
                       f"budget (it listens on loopback only); set {keys}")
        else:
            out.append(f"the OpenAI gateway is open to the network: it listens on "
                       f"{_where(g.host, g.port)} with no API keys, so anyone who can reach it "
                       f"can use the mesh and spend its budget; set {keys}, or "
                       + _field("gateway", "host", "127.0.0.1"))
    return out


def announce(cfg: MeshConfig, stream: TextIO | None = None) -> list[str]:
    """Print each open surface to `stream` (stderr) as `warning: ...` and log it too."""
    found = open_surfaces(cfg)
    for msg in found:
        print(f"warning: {msg}", file=stream or sys.stderr, flush=True)
        log.warning("open surface: %s", msg)
    return found
