"""`meshd status`: the coordinator's node table, fetched with a signed admin request."""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from google.protobuf.json_format import MessageToDict

from meshd.commands import CommandError
from meshd.config import MeshConfig
from meshd.coordinator.actors import ADMIN_KEY_FILE
from meshd.node_agent import identity
from meshd.node_agent.client import ControlClient, ControlError
from meshd.proto.v1 import control_pb2 as pb

ROLE = {pb.WORKER_ROLE_PREFILL: "P", pb.WORKER_ROLE_DECODE: "D", pb.WORKER_ROLE_BOTH: "PD"}


async def fetch(address: str, ident: identity.Identity, timeout_s: float = 5.0
                ) -> pb.StatusReply:
    client = ControlClient(address, ident, timeout_s)
    try:
        return await client.status()
    finally:
        await client.close()


def table(reply: pb.StatusReply) -> str:
    rows = [f"{'NODE':<20} {'HOST':<22} {'GPUS':<16} {'STATE':<8} {'LAST HB':<9} WORKERS"]
    for n in reply.nodes:
        gpus = f"{n.gpu_count}x {n.gpu_names[0]}" if n.gpu_count else "cpu"
        workers = ", ".join(f"{w.worker_id}({ROLE.get(w.role, '?')})" for w in n.workers) or "-"
        rows.append(f"{n.node_id:<20} {n.host[:22]:<22} {gpus[:16]:<16} {n.state:<8} "
                    f"{n.heartbeat_age_s:>6.1f}s  {workers}")
    if not reply.nodes:
        rows.append("(no nodes registered)")
    return "\n".join(rows)


def run(args: argparse.Namespace, cfg: MeshConfig) -> int:
    try:
        ident = identity.load(f"{cfg.coordinator.state_dir}/{ADMIN_KEY_FILE}")
    except identity.IdentityError as e:
        raise CommandError(f"{e}; run `meshd status` on the coordinator host "
                           "(or point --state-dir at its state dir)") from None
    address = args.coordinator or f"{cfg.coordinator.grpc_host}:{cfg.coordinator.grpc_port}"
    try:
        reply = asyncio.run(fetch(address, ident, cfg.agent.rpc_timeout_s))
    except ControlError as e:
        raise CommandError(f"coordinator {address}: {e.code.name}: {e.detail}") from None
    if args.json:
        print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2))
    else:
        print(f"coordinator {address}, up {time.time() - reply.coordinator_started_unix:.0f}s")
        print(table(reply))
    return 0
