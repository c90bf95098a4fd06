"""The agent's side of the control plane: signed calls to the coordinator over gRPC (asyncio).

Every call seals a fresh envelope (new nonce, current time) so a retry is never a replay.
A refusal surfaces as `ControlError` carrying the gRPC code and meshd's reason
(`meshd-reject-reason` trailer: bad_signature, revoked_key, not_registered, ...).
"""

from __future__ import annotations

from typing import Any

import grpc

from meshd.envelope import REASON_KEY, SERVICE, Signer, seal
from meshd.proto.v1 import control_pb2 as pb

_REPLIES: dict[str, Any] = {
    "Register": pb.RegisterReply, "Heartbeat": pb.HeartbeatReply,
    "Deregister": pb.DeregisterReply, "Status": pb.StatusReply, "SetRole": pb.SetRoleReply,
}


class ControlError(Exception):
    def __init__(self, code: grpc.StatusCode, reason: str, detail: str) -> None:
        super().__init__(f"{code.name}: {detail}")
        self.code = code
        self.reason = reason
        self.detail = detail


class ControlClient:
    def __init__(self, address: str, signer: Signer, timeout_s: float = 5.0,
                 channel: grpc.aio.Channel | None = None) -> None:
        """`channel`: share an existing channel (not closed by `close`); else open one."""
        self.address = address
        self.signer = signer
        self.timeout_s = timeout_s
        self._owns_channel = channel is None
        self._channel = channel or grpc.aio.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", 64 << 20)])

    @property
    def channel(self) -> grpc.aio.Channel:
        return self._channel

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()

    async def call_raw(self, method: str, raw: bytes, timeout_s: float | None = None) -> Any:
        """Send raw envelope bytes; returns the parsed reply or raises ControlError."""
        stub = self._channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=None,
                                         response_deserializer=_REPLIES[method].FromString)
        try:
            return await stub(raw, timeout=timeout_s or self.timeout_s)
        except grpc.aio.AioRpcError as e:
            reason = dict(e.trailing_metadata() or ()).get(REASON_KEY, "")
            raise ControlError(e.code(), str(reason), e.details() or "") from None

    async def call(self, method: str, payload: bytes, timeout_s: float | None = None) -> Any:
        env = seal(self.signer, method, payload)
        return await self.call_raw(method, env.SerializeToString(), timeout_s)

    async def register(self, report: pb.CapabilityReport, join_token: str = ""
                       ) -> pb.RegisterReply:
        req = pb.RegisterRequest(capabilities=report, join_token=join_token)
        reply: pb.RegisterReply = await self.call("Register", req.SerializeToString())
        return reply

    async def heartbeat(self, req: pb.HeartbeatRequest) -> pb.HeartbeatReply:
        reply: pb.HeartbeatReply = await self.call("Heartbeat", req.SerializeToString())
        return reply

    async def deregister(self, reason: str = "", timeout_s: float | None = None) -> None:
        await self.call("Deregister", pb.DeregisterRequest(reason=reason).SerializeToString(),
                        timeout_s)

    async def set_role(self, node_id: str, worker_id: str, role: pb.WorkerRole
                       ) -> pb.SetRoleReply:
        """Admin keys: ask `worker_id` of `node_id` to take `role` (a pb WorkerRole)."""
        req = pb.SetRoleRequest(node_id=node_id, worker_id=worker_id, role=role)
        reply: pb.SetRoleReply = await self.call("SetRole", req.SerializeToString())
        return reply

    async def status(self) -> pb.StatusReply:
        reply: pb.StatusReply = await self.call("Status", pb.StatusRequest().SerializeToString())
        return reply
