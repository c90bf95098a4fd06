"""The one place that reads `MESHD_*` environment variables.

Every other module gets its settings from `meshd.config`; this module turns the environment into
a nested override dict (`MESHD_COORDINATOR_GRPC_PORT=7000` -> {"coordinator": {"grpc_port":
"7000"}}) that the config loader coerces and validates like values from the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

PREFIX = "MESHD_"
# Variables that are not config fields.
CONFIG_FILE_VAR = "MESHD_CONFIG"


def config_file(environ: Mapping[str, str] | None = None) -> str | None:
    """Path of the config file named by `MESHD_CONFIG`, if any."""
    env = os.environ if environ is None else environ
    return env.get(CONFIG_FILE_VAR) or None


def overrides(sections: Mapping[str, tuple[str, ...]],
              environ: Mapping[str, str] | None = None) -> dict[str, dict[str, str]]:
    """Collect `MESHD_<SECTION>_<FIELD>` variables for the known sections and fields.

    A variable that names no known section/field is ignored here; `unknown()` reports them.
    """
    env = os.environ if environ is None else environ
    out: dict[str, dict[str, str]] = {}
    for section, fields in sections.items():
        for field in fields:
            var = f"{PREFIX}{section}_{field}".upper()
            if var in env:
                out.setdefault(section, {})[field] = env[var]
    return out


def unknown(sections: Mapping[str, tuple[str, ...]],
            environ: Mapping[str, str] | None = None) -> list[str]:
    """`MESHD_*` variables that match no config field (typos an operator should hear about)."""
    env = os.environ if environ is None else environ
    known = {f"{PREFIX}{s}_{f}".upper() for s, fs in sections.items() for f in fs}
    known.add(CONFIG_FILE_VAR)
    return sorted(v for v in env if v.startswith(PREFIX) and v not in known)
