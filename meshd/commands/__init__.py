"""`meshd` subcommands, one module each; `run` dispatches on the parsed arguments."""

from __future__ import annotations

import argparse
import importlib

from meshd.config import MeshConfig


class CommandError(Exception):
    """A command failed for a reason the operator can act on; printed without a traceback."""


_MODULES = {"up": "up", "coordinator": "coordinator", "agent": "agent", "status": "status",
            "identity": "identity", "trust": "trust", "engine": "engine"}


def run(args: argparse.Namespace, cfg: MeshConfig) -> int:
    module = importlib.import_module(f"meshd.commands.{_MODULES[args.command]}")
    code: int = module.run(args, cfg)
    return code
