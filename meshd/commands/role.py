"""`meshd role set NODE WORKER ROLE`: ask a worker to take another role (prefill, decode,
both), with a signed admin request to the coordinator (the key in its state dir, as `meshd
status` uses). The worker leaves the routing set at once; its agent drains it (the running
requests finish), restarts it in the new role, and reports it again under a new worker id;
`meshd status` shows the change pending until the agent took it."""

from __future__ import annotations

import argparse
import asyncio

from meshd import capabilities as caps
from meshd.commands import CommandError
from meshd.config import MeshConfig
from meshd.coordinator.actors import ADMIN_KEY_FILE
from meshd.node_agent import identity
from meshd.node_agent.client import ControlClient, ControlError


async def set_role(address: str, ident: identity.Identity, node_id: str, worker_id: str,
                   role: str, timeout_s: float = 5.0) -> int:
    """The change's generation; raises ControlError when the coordinator refuses."""
    client = ControlClient(address, ident, timeout_s)
    try:
        reply = await client.set_role(node_id, worker_id, caps.ROLES[role])
        return int(reply.generation)
    finally:
        await client.close()


def run(args: argparse.Namespace, cfg: MeshConfig) -> int:
    try:
        ident = identity.load(f"{cfg.coordinator.state_dir}/{ADMIN_KEY_FILE}")
    except identity.IdentityError as e:
        raise CommandError(f"{e}; run `meshd role` on the coordinator host "
                           "(or point --state-dir at its state dir)") from None
    address = args.coordinator or f"{cfg.coordinator.grpc_host}:{cfg.coordinator.grpc_port}"
    try:
        gen = asyncio.run(set_role(address, ident, args.node, args.worker, args.role,
                                   cfg.agent.rpc_timeout_s))
    except ControlError as e:
        raise CommandError(f"coordinator {address}: {e.code.name}: {e.detail}") from None
    print(f"asked {args.worker} on {args.node} to take role {args.role} (change {gen}); "
          f"its agent drains and restarts it — `meshd status` shows it")
    return 0
