"""The one place that reads `MESHD_*` environment variables.

Every other module gets its settings from `meshd.config`; this module turns the environment into
a nested override dict (`MESHD_COORDINATOR_GRPC_PORT=7000` -> {"coordinator": {"grpc_port":
"7000"}}) that the config loader coerces and validates like values from the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import Any

PREFIX = "MESHD_"
# Variables that are not config fields.
CONFIG_FILE_VAR = "MESHD_CONFIG"
API_KEY_VAR = "MESHD_API_KEY"
_NOT_CONFIG = (CONFIG_FILE_VAR, API_KEY_VAR)


def config_file(environ: Mapping[str, str] | None = None) -> str | None:
    """Path of the config file named by `MESHD_CONFIG`, if any."""
    env = os.environ if environ is None else environ
    return env.get(CONFIG_FILE_VAR) or None


def api_key(environ: Mapping[str, str] | None = None) -> str | None:
    """The gateway API key a client command (`meshd usage`) sends, from `MESHD_API_KEY`
    (None when unset or empty)."""
    env = os.environ if environ is None else environ
    return env.get(API_KEY_VAR) or None


def var_name(section: str, path: str) -> str:
    """`gateway`, `deadlines.total_s` -> `MESHD_GATEWAY_DEADLINES_TOTAL_S`."""
    return f"{PREFIX}{section}_{path.replace('.', '_')}".upper()


def overrides(sections: Mapping[str, tuple[str, ...]],
              environ: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Collect `MESHD_<SECTION>_<FIELD>` variables for the known sections and field paths
    (a nested section's field `deadlines.total_s` is `MESHD_GATEWAY_DEADLINES_TOTAL_S`).

    A variable that names no known section/field is ignored here; `unknown()` reports them.
    """
    env = os.environ if environ is None else environ
    out: dict[str, dict[str, Any]] = {}
    for section, paths in sections.items():
        for path in paths:
            var = var_name(section, path)
            if var in env:
                node = out.setdefault(section, {})
                *parents, leaf = path.split(".")
                for p in parents:
                    node = node.setdefault(p, {})
                node[leaf] = env[var]
    return out


def unknown(sections: Mapping[str, tuple[str, ...]],
            environ: Mapping[str, str] | None = None) -> list[str]:
    """`MESHD_*` variables that match no config field (typos an operator should hear about)."""
    env = os.environ if environ is None else environ
    known = {var_name(s, f) for s, fs in sections.items() for f in fs}
    known.update(_NOT_CONFIG)
    return sorted(v for v in env if v.startswith(PREFIX) and v not in known)


# gRPC's fork handlers are for children that keep using gRPC after fork(); meshd's children
# exec (workers, Ray's processes), and with the handlers on, every fork while a gRPC thread is
# busy prints "fork_posix.cc ... skipping fork() handlers" into the console.
GRPC_DEFAULTS = {"GRPC_ENABLE_FORK_SUPPORT": "0"}


def grpc_defaults(environ: MutableMapping[str, str] | None = None) -> None:
    """Set meshd's gRPC defaults in the process environment (before gRPC is imported), unless
    the operator set them; Ray and worker processes inherit them."""
    env = os.environ if environ is None else environ
    for k, v in GRPC_DEFAULTS.items():
        env.setdefault(k, v)
