"""The control-plane service: verifies signed envelopes and keeps the node table.

`ControlPlane` is the logic (verify, register, heartbeat, deregister, status, liveness sweep);
`coordinator.server` exposes it over gRPC. Handlers receive raw request bytes so that a
malformed or oversized message gets a clear INVALID_ARGUMENT / RESOURCE_EXHAUSTED instead of
gRPC's generic deserialization failure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from google.protobuf.message import DecodeError

from meshd import capabilities as caps
from meshd.config import CoordinatorConfig
from meshd.coordinator import claims
from meshd.coordinator.metrics import ControlMetrics
from meshd.coordinator.nodes import ALIVE, LEFT, Node, NodeTable
from meshd.coordinator.roles import RoleAsk, RoleBook
from meshd.coordinator.store import NodeRow, Store
from meshd.coordinator.verify import Rejected, Verified, Verifier
from meshd.proto.v1 import control_pb2 as pb

log = logging.getLogger("meshd.coordinator")
# An ask no agent has taken this long is dropped (an old agent, or one gone without leaving):
# longer than the agent's drain deadline, so a slow drain is never cut short here.
ROLE_ASK_MAX_AGE_S = 300.0


class RequestError(Exception):
    """A request that passed authentication but cannot be served (bad payload, not registered).
    `code` is a gRPC status code name."""

    def __init__(self, code: str, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Sealed:
    """A parsed and verified request."""

    who: Verified
    envelope: pb.SignedEnvelope


class ControlPlane:
    def __init__(self, config: CoordinatorConfig, store: Store, metrics: ControlMetrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.started_at = clock()
        self.verifier = Verifier(store, config.timestamp_window_s, clock, self.started_at)
        self.table = NodeTable(config.suspect_after_s, config.dead_after_s)
        self.roles = RoleBook()
        now = clock()
        revoked = self._revoked()
        self.table.restore((Node(r.node_id, r.public_key, caps.from_dict(r.capabilities),
                                 r.registered_at, r.last_heartbeat,
                                 LEFT if r.public_key in revoked else r.state)
                            for r in store.nodes()), now)
        self.metrics.set_node_counts(self.table.counts())

    # -- envelope handling ------------------------------------------------------------------

    def open(self, raw: bytes, method: str, join_token_of: Callable[[bytes], str] | None = None,
             admin: bool = False) -> Sealed:
        """Parse and verify raw envelope bytes; raises Rejected."""
        if len(raw) > self.config.max_message_bytes:
            raise Rejected("oversized", f"message is {len(raw)} bytes; the limit is "
                           f"{self.config.max_message_bytes}")
        try:
            env = pb.SignedEnvelope.FromString(raw)
        except DecodeError as e:
            raise Rejected("malformed", f"envelope is not a valid SignedEnvelope: {e}") from None
        token = join_token_of(env.payload) if join_token_of else ""
        return Sealed(self.verifier.check(env, method, token, admin), env)

    # -- methods ----------------------------------------------------------------------------

    async def register(self, raw: bytes, peer: str = "") -> pb.RegisterReply:
        """`peer`: the gRPC peer (`ipv4:host:port`), whose host the node's workers must listen
        on unless the operator pinned another for its key (`claims.py`)."""
        sealed = self.open(raw, "Register", _join_token)
        req = _parse(pb.RegisterRequest, sealed.envelope.payload)
        try:
            report = caps.from_pb(req.capabilities)
        except ValueError as e:
            raise RequestError("INVALID_ARGUMENT", "bad_capabilities", str(e)) from None
        who = sealed.who
        if who.role != "agent":
            raise RequestError("PERMISSION_DENIED", "not_agent",
                               "admin keys cannot register as nodes")
        key = await asyncio.to_thread(self.store.key, who.public_key)
        try:
            claims.check(who.node_id, report, claims.peer_host(peer),
                         key.pinned_host if key is not None else "", self.table.nodes.values())
            claims.check_attributes(dict(report.attributes),
                                    key.attributes if key is not None else {})
        except claims.Refused as e:
            code = "ALREADY_EXISTS" if e.reason.endswith("_taken") else "PERMISSION_DENIED"
            raise RequestError(code, e.reason, e.detail) from None
        now = self.clock()
        node = self.table.register(who.node_id, who.public_key, report, now)
        await asyncio.to_thread(self.store.upsert_node, NodeRow(
            node.node_id, node.public_key, caps.to_dict(report), now, now, node.state))
        self.metrics.registered("enrolled" if who.enrolled else "trusted")
        self.metrics.set_node_counts(self.table.counts())
        return pb.RegisterReply(node_id=who.node_id,
                                heartbeat_interval_s=self.config.heartbeat_interval_s,
                                enrolled=who.enrolled)

    def heartbeat(self, raw: bytes) -> pb.HeartbeatReply:
        sealed = self.open(raw, "Heartbeat")
        req = _parse(pb.HeartbeatRequest, sealed.envelope.payload)
        now = self.clock()
        try:
            change = self.table.heartbeat(sealed.who.node_id, req.seq, now)
        except KeyError:
            raise RequestError("FAILED_PRECONDITION", "not_registered",
                               f"node {sealed.who.node_id} is not registered; register first"
                               ) from None
        self.metrics.heartbeat(now - sealed.envelope.timestamp_ms / 1000.0)
        if change is not None:
            self.metrics.set_node_counts(self.table.counts())
        node_id = sealed.who.node_id
        self.roles.ack(node_id, req.role_generation)
        return pb.HeartbeatReply(heartbeat_interval_s=self.config.heartbeat_interval_s,
                                 state=ALIVE, role_changes=[
                                     _role_pb(a) for a in self.roles.pending(node_id)])

    async def deregister(self, raw: bytes) -> pb.DeregisterReply:
        sealed = self.open(raw, "Deregister")
        _parse(pb.DeregisterRequest, sealed.envelope.payload)
        if self.table.deregister(sealed.who.node_id) is not None:
            await self.flush()
        self.roles.forget(sealed.who.node_id)
        return pb.DeregisterReply()

    def set_role(self, raw: bytes) -> pb.SetRoleReply:
        """An admin asks a worker to take another role (the agent drains and restarts it)."""
        req = _parse(pb.SetRoleRequest, self.open(raw, "SetRole", admin=True).envelope.payload)
        role = caps.role_name(req.role)
        node = self.table.nodes.get(req.node_id)
        if node is None or node.state != ALIVE:
            raise RequestError("NOT_FOUND", "no_such_node",
                               f"node {req.node_id!r} is not alive in the mesh")
        worker = next((w for w in node.capabilities.workers
                       if w.worker_id == req.worker_id), None)
        if worker is None:
            raise RequestError("NOT_FOUND", "no_such_worker",
                               f"node {req.node_id} reports no worker {req.worker_id!r}")
        if role is None:
            raise RequestError("INVALID_ARGUMENT", "bad_role",
                               "role must be prefill, decode or both")
        if worker.role == role:
            raise RequestError("FAILED_PRECONDITION", "same_role",
                               f"worker {worker.worker_id} already has role {role}")
        if not (worker.engine == "embedded" or
                (worker.engine == "vllm" and worker.kv_transfer_endpoint)):
            raise RequestError("UNIMPLEMENTED", "engine_cannot_rerole",
                               f"worker {worker.worker_id} runs engine {worker.engine!r}"
                               + (" without a KV connector" if worker.engine == "vllm" else "")
                               + "; embedded workers and vLLM workers with a KV connector "
                               "change roles at runtime")
        try:
            ask = self.roles.ask(node.node_id, worker.worker_id, role, self.clock())
        except ValueError as e:
            raise RequestError("FAILED_PRECONDITION", "role_change_pending", str(e)) from None
        return pb.SetRoleReply(generation=ask.generation)

    def status(self, raw: bytes) -> pb.StatusReply:
        self.open(raw, "Status", admin=True)
        now = self.clock()
        out = pb.StatusReply(coordinator_started_unix=self.started_at)
        for n in sorted(self.table.nodes.values(), key=lambda n: n.node_id):
            c = n.capabilities
            out.nodes.append(pb.NodeStatus(
                node_id=n.node_id, host=c.host.address or c.host.hostname,
                gpu_count=len(c.gpus), gpu_names=[g.name for g in c.gpus], state=n.state,
                last_heartbeat_unix=n.last_heartbeat, heartbeat_age_s=now - n.last_heartbeat,
                workers=[caps.worker_to_pb(replace(w, api_token=""))
                         for w in c.workers],
                attributes=dict(c.attributes), ray_node_id=c.ray_node_id,
                pending_roles=[_role_pb(a) for a in self.roles.pending(n.node_id)]))
        return out

    def routable_workers(self) -> list[caps.Member]:
        """Every worker of every alive node whose key is not revoked, with its node's
        attributes and its expert placement: the routing set. A key revoked in the trust store
        (by the CLI, on the same SQLite file) takes its node out of the next answer."""
        revoked = self._revoked()
        return [m for n in self.table.nodes.values()
                if n.state == ALIVE and n.public_key not in revoked
                for m in caps.members(n.node_id, n.capabilities)
                if m.worker.worker_id not in self.roles.draining(n.node_id)]

    def _revoked(self) -> set[bytes]:
        return {k.public_key for k in self.store.list_keys() if k.state == "revoked"}

    # -- liveness ---------------------------------------------------------------------------

    async def sweep(self) -> None:
        """Advance liveness, retire the nodes whose key was revoked (they leave: their
        claims are given up, and a heartbeat is refused), and persist what changed."""
        now = self.clock()
        self.table.tick(now)
        for node_id, ask in self.roles.expire(now, ROLE_ASK_MAX_AGE_S):
            log.warning("role change %d of %s on %s: not taken by its agent in %.0fs; "
                        "dropped (the worker is routed to again)", ask.generation,
                        ask.worker_id, node_id, ROLE_ASK_MAX_AGE_S)
        revoked = await asyncio.to_thread(self._revoked)
        for n in list(self.table.nodes.values()):
            if n.public_key in revoked:
                self.table.deregister(n.node_id)
        await self.flush()  # persists the changes and sets the node gauges

    async def flush(self) -> None:
        rows = self.table.take_dirty()
        if rows:
            await asyncio.to_thread(self.store.update_liveness, rows)
        self.metrics.set_node_counts(self.table.counts())


def _role_pb(a: RoleAsk) -> pb.RoleChange:
    return pb.RoleChange(worker_id=a.worker_id, role=caps.ROLES[a.role], generation=a.generation)


def _join_token(payload: bytes) -> str:
    try:
        return pb.RegisterRequest.FromString(payload).join_token
    except DecodeError:
        return ""  # reported as a malformed payload after authentication


M = TypeVar("M", pb.RegisterRequest, pb.HeartbeatRequest, pb.DeregisterRequest,
            pb.SetRoleRequest)


def _parse(cls: type[M], payload: bytes) -> M:
    try:
        return cls.FromString(payload)
    except DecodeError as e:
        raise RequestError("INVALID_ARGUMENT", "malformed",
                           f"payload is not a valid {cls.__name__}: {e}") from None
