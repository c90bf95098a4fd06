"""`meshd engine serve`: the embedded engine's OpenAI-compatible worker server."""

from __future__ import annotations

import argparse
import asyncio

from meshd.commands import CommandError
from meshd.config import MeshConfig


def run(args: argparse.Namespace, cfg: MeshConfig) -> int:
    from meshd.node_agent.engine.worker_config import from_args

    try:
        worker = from_args(args)
    except ValueError as e:
        raise CommandError(str(e)) from None
    from meshd.node_agent.engine.worker_server import serve  # imports torch: only when serving

    asyncio.run(serve(worker))
    return 0
