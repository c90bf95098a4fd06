"""`meshd identity show`: this host's node id and public key (created on first use)."""

from __future__ import annotations

import argparse

from meshd.commands import CommandError
from meshd.config import MeshConfig
from meshd.node_agent import identity


def run(args: argparse.Namespace, cfg: MeshConfig) -> int:
    try:
        ident = identity.load_or_create(cfg.agent.state_dir)
    except identity.IdentityError as e:
        raise CommandError(str(e)) from None
    print(f"node id:    {ident.node_id}")
    print(f"public key: {ident.public_key.hex()}")
    print(f"key file:   {ident.path}")
    print(f"trust it on the coordinator host with: meshd trust add {ident.public_key.hex()}")
    return 0
