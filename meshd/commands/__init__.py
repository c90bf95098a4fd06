"""`meshd` subcommands, one module each; `run` dispatches on the parsed arguments.

Shared by the commands: `CommandError`, and `gateway_get`, how a command asks the gateway's HTTP
API (`meshd status`'s debug sections, `meshd usage`).
"""

from __future__ import annotations

import argparse
import http.client
import importlib
import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any, NamedTuple

from meshd.config import MeshConfig


class CommandError(Exception):
    """A command failed for a reason the operator can act on; printed without a traceback."""


class GatewayReply(NamedTuple):
    """The gateway's answer to one GET (`gateway_get`)."""

    address: str  # host:port asked ([v6]:port)
    status: int  # the HTTP status; 0 when no answer came (refused, timed out, cut off)
    body: Any  # the decoded JSON (an error's too); None when the answer held no JSON
    why: str  # "" for a 2xx JSON answer; else what went wrong, with the gateway's message


def gateway_hostport(address: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[v6]:PORT`) as (host, port); CommandError naming what is wrong."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CommandError(f"gateway address {address!r}: expected HOST:PORT")
    return host, int(port)


def gateway_address(host: str, port: int) -> str:
    """Where a client reaches a gateway bound to `host` (a wildcard host: this machine)."""
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def gateway_get(host: str, port: int, path: str, headers: Mapping[str, str] | None = None,
                timeout_s: float = 2.0) -> GatewayReply:
    """GET `path` (with its query) from the gateway at `host`:`port` and decode its JSON.

    Never raises for a down or misbehaving gateway: no answer is status 0 with the reason; an
    HTTP error keeps its status, its body and, in `why`, its OpenAI-shaped error message.
    """
    address = gateway_address(host, port)
    req = urllib.request.Request(f"http://{address}{path}", headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status = e.code
        try:
            raw = e.read()
        except (OSError, http.client.HTTPException):
            raw = b""
    except (OSError, http.client.HTTPException, ValueError) as e:  # refused, timeout, bad URL
        return GatewayReply(address, 0, None, str(getattr(e, "reason", e)) or type(e).__name__)
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if 200 <= status < 300:
        return GatewayReply(address, status, body, "" if body is not None else "not JSON")
    err = body.get("error") if isinstance(body, dict) else None
    message = err.get("message") if isinstance(err, dict) else None
    return GatewayReply(address, status, body,
                        f"HTTP {status}: {message}" if message else f"HTTP {status}")


_MODULES = {"up": "up", "coordinator": "coordinator", "agent": "agent", "status": "status",
            "usage": "usage", "identity": "identity", "trust": "trust", "engine": "engine",
            "receipt": "receipt", "role": "role", "plan": "plan", "targets": "targets"}


def run(args: argparse.Namespace, cfg: MeshConfig) -> int:
    module = importlib.import_module(f"meshd.commands.{_MODULES[args.command]}")
    code: int = module.run(args, cfg)
    return code
