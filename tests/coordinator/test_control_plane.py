"""The control plane over real gRPC on loopback: every acceptance and every rejection."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from support.control import control_server, make_agent, make_config, make_report, wait_for
from support.net import free_port

from meshd import capabilities as caps
from meshd.coordinator.nodes import Transition
from meshd.envelope import seal
from meshd.node_agent.agent import AgentRefused
from meshd.node_agent.client import ControlClient, ControlError
from meshd.node_agent.identity import Identity
from meshd.proto.v1 import control_pb2 as pb


def register_payload(token: str = "") -> bytes:
    return pb.RegisterRequest(capabilities=caps.to_pb(make_report()),
                              join_token=token).SerializeToString()


def rejections(running: object, reason: str) -> float:
    reg = running.server.metrics.registry  # type: ignore[attr-defined]
    total = 0.0
    for metric in reg.collect():
        for s in metric.samples:
            if s.name == "meshd_rejections_total" and s.labels["reason"] == reason:
                total += s.value
    return total


async def expect(client: ControlClient, method: str, raw: bytes, code: grpc.StatusCode,
                 reason: str) -> ControlError:
    with pytest.raises(ControlError) as info:
        await client.call_raw(method, raw)
    assert info.value.code == code, info.value
    assert info.value.reason == reason
    assert info.value.detail.startswith(f"{reason}: ")
    return info.value


async def test_register_heartbeat_status(state_dir: Path) -> None:
    async with control_server(make_config(state_dir)) as run:
        ident = Identity.generate()
        run.store.add_key(ident.public_key, ident.node_id)
        w = caps.Worker("w0", "http://127.0.0.1:8100", "decode", "tiny", kv_block_size=16)
        agent = make_agent(run.address, ident, report=make_report("gpu-7", (w,)))
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await wait_for(lambda: agent.status.registered)
        node = run.server.plane.table.nodes[ident.node_id]
        assert node.capabilities.host.hostname == "gpu-7"
        assert node.capabilities.workers == (w,)
        agent.interval_s = 0.05
        await wait_for(lambda: agent.status.heartbeats >= 2)
        stop.set()
        await asyncio.wait_for(task, 5)
        assert run.server.plane.table.nodes[ident.node_id].state == "left"
        run.server.plane.table.check_integrity()
        assert [n.state for n in run.store.nodes()] == ["left"]


async def test_each_rejection_has_its_status_and_reason(state_dir: Path) -> None:
    async with control_server(make_config(state_dir, timestamp_window_s=5)) as run:
        good, stranger = Identity.generate(), Identity.generate()
        run.store.add_key(good.public_key, good.node_id)
        client = ControlClient(run.address, good)
        payload = register_payload()

        env = seal(good, "Register", payload)
        env.signature = bytes(64)
        await expect(client, "Register", env.SerializeToString(),
                     grpc.StatusCode.UNAUTHENTICATED, "bad_signature")
        env = seal(good, "Register", payload)
        env.payload = register_payload("tampered")  # signature no longer covers it
        await expect(client, "Register", env.SerializeToString(),
                     grpc.StatusCode.UNAUTHENTICATED, "bad_signature")
        # signed for Heartbeat, sent as Register: method binding
        raw = seal(good, "Heartbeat", payload).SerializeToString()
        await expect(client, "Register", raw, grpc.StatusCode.UNAUTHENTICATED, "bad_signature")

        raw = seal(good, "Register", payload).SerializeToString()
        await client.call_raw("Register", raw)
        await expect(client, "Register", raw, grpc.StatusCode.UNAUTHENTICATED, "replayed_nonce")

        old = int((time.time() - 60) * 1000)
        raw = seal(good, "Register", payload, timestamp_ms=old).SerializeToString()
        await expect(client, "Register", raw, grpc.StatusCode.UNAUTHENTICATED, "stale_timestamp")
        future = int((time.time() + 60) * 1000)
        raw = seal(good, "Register", payload, timestamp_ms=future).SerializeToString()
        await expect(client, "Register", raw, grpc.StatusCode.UNAUTHENTICATED, "stale_timestamp")

        raw = seal(stranger, "Register", payload).SerializeToString()
        await expect(client, "Register", raw, grpc.StatusCode.PERMISSION_DENIED, "unknown_key")

        run.store.revoke_key(good.node_id)
        raw = seal(good, "Heartbeat", b"").SerializeToString()
        await expect(client, "Heartbeat", raw, grpc.StatusCode.PERMISSION_DENIED, "revoked_key")

        raw = seal(stranger, "Status", b"").SerializeToString()
        await expect(client, "Status", raw, grpc.StatusCode.PERMISSION_DENIED, "unknown_key")
        await client.close()
        for reason in ("bad_signature", "replayed_nonce", "stale_timestamp", "unknown_key",
                       "revoked_key"):
            assert rejections(run, reason) >= 1, reason
        assert rejections(run, "bad_signature") == 3


async def test_join_token_enrolls_once(state_dir: Path) -> None:
    cfg = make_config(state_dir)
    async with control_server(cfg) as run:
        token = run.store.create_token(60, "rack 4")
        first = make_agent(run.address, token=token)
        stop = asyncio.Event()
        task = asyncio.create_task(first.run(stop))
        await wait_for(lambda: first.status.registered)
        rec = run.store.key(first.identity.public_key)
        assert rec is not None and rec.source.startswith("token:") and rec.label == "rack 4"
        stop.set()
        await task

        second = make_agent(run.address, token=token)
        with pytest.raises(AgentRefused, match="already used"):
            await asyncio.wait_for(second.run(asyncio.Event()), 5)
        expired = run.store.create_token(1e-3)
        await asyncio.sleep(0.01)
        with pytest.raises(AgentRefused, match="expired"):
            await asyncio.wait_for(make_agent(run.address, token=expired).run(asyncio.Event()), 5)
        with pytest.raises(AgentRefused, match="not valid"):
            await asyncio.wait_for(
                make_agent(run.address, token="mjt_0000.bogus").run(asyncio.Event()), 5)
        assert rejections(run, "token_used") == 1
        assert rejections(run, "token_expired") == 1
        assert rejections(run, "token_invalid") == 1
        # the enrolled key keeps working without the token
        again = make_agent(run.address, first.identity)
        stop = asyncio.Event()
        task = asyncio.create_task(again.run(stop))
        await wait_for(lambda: again.status.registered)
        stop.set()
        await task


async def test_malformed_and_oversized_messages(state_dir: Path) -> None:
    async with control_server(make_config(state_dir, max_message_bytes=4096)) as run:
        ident = Identity.generate()
        run.store.add_key(ident.public_key, ident.node_id)
        client = ControlClient(run.address, ident)
        await expect(client, "Register", b"\xff\xff\xff\x00garbage",
                     grpc.StatusCode.INVALID_ARGUMENT, "malformed")
        await expect(client, "Heartbeat", pb.SignedEnvelope(payload=b"x").SerializeToString(),
                     grpc.StatusCode.INVALID_ARGUMENT, "malformed")
        raw = seal(ident, "Register", b"\x0a\xff\xff").SerializeToString()  # bad inner payload
        await expect(client, "Register", raw, grpc.StatusCode.INVALID_ARGUMENT, "malformed")
        big = seal(ident, "Register", b"\x00" * 8000).SerializeToString()
        await expect(client, "Register", big, grpc.StatusCode.RESOURCE_EXHAUSTED, "oversized")
        huge = b"\x00" * (1 << 20)  # beyond gRPC's own hard cap (4x the limit)
        with pytest.raises(ControlError) as info:
            await client.call_raw("Register", huge)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        no_host = pb.RegisterRequest(capabilities=pb.CapabilityReport()).SerializeToString()
        raw = seal(ident, "Register", no_host).SerializeToString()
        err = await expect(client, "Register", raw, grpc.StatusCode.INVALID_ARGUMENT,
                           "bad_capabilities")
        assert "hostname" in err.detail
        # the server still serves after all that
        await client.register(caps.to_pb(make_report()))
        await client.close()


async def test_heartbeat_loss_suspect_then_dead_then_back(state_dir: Path) -> None:
    cfg = make_config(state_dir, heartbeat_interval_s=0.1, suspect_after_s=0.4,
                      dead_after_s=1.4)
    async with control_server(cfg) as run:
        ident = Identity.generate()
        run.store.add_key(ident.public_key, ident.node_id)
        client = ControlClient(run.address, ident)
        await client.register(caps.to_pb(make_report()))
        table = run.server.plane.table
        # record every transition the server's sweep makes (polling the state races it)
        seen: list[str] = [table.nodes[ident.node_id].state]
        tick = table.tick

        def recording_tick(now: float) -> list[Transition]:
            out = tick(now)
            seen.extend(t.new for t in out if t.node_id == ident.node_id)
            return out

        table.tick = recording_tick  # type: ignore[method-assign]
        await wait_for(lambda: table.nodes[ident.node_id].state == "dead", 5)
        await client.heartbeat(pb.HeartbeatRequest(seq=1))
        assert table.nodes[ident.node_id].state == "alive"
        assert seen == ["alive", "suspect", "dead"]
        table.check_integrity()
        await run.server.plane.flush()
        assert run.store.nodes()[0].state == "alive"
        # an unregistered node's heartbeat is told to register
        other = Identity.generate()
        run.store.add_key(other.public_key, other.node_id)
        c2 = ControlClient(run.address, other)
        with pytest.raises(ControlError) as info:
            await c2.heartbeat(pb.HeartbeatRequest(seq=1))
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert info.value.reason == "not_registered"
        await client.close()
        await c2.close()


async def test_agent_reattaches_after_coordinator_restart(state_dir: Path) -> None:
    cfg = make_config(state_dir, port=free_port(), heartbeat_interval_s=0.1,
                      suspect_after_s=1.0, dead_after_s=3.0)
    ident = Identity.generate()
    async with control_server(cfg) as run:
        run.store.add_key(ident.public_key, ident.node_id)
        agent = make_agent(run.address, ident)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await wait_for(lambda: agent.status.heartbeats >= 1)
    # coordinator gone: the agent keeps retrying
    await asyncio.sleep(0.3)
    assert agent.status.last_error.startswith("UNAVAILABLE")
    async with control_server(cfg) as run2:
        table = run2.server.plane.table
        assert ident.node_id in table.nodes  # restored from the store
        before = agent.status.heartbeats
        await wait_for(lambda: agent.status.heartbeats > before, 10)
        assert agent.status.registrations == 1  # re-attached without re-registering
        assert table.nodes[ident.node_id].state == "alive"
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_unknown_keys_do_not_grow_the_nonce_cache(state_dir: Path) -> None:
    async with control_server(make_config(state_dir)) as run:
        good = Identity.generate()
        run.store.add_key(good.public_key, good.node_id)
        client = ControlClient(run.address, good)
        cache = run.server.plane.verifier.nonces
        before = len(cache)
        for _ in range(50):  # self-signed, valid signatures, keys nobody trusts
            raw = seal(Identity.generate(), "Register", register_payload()).SerializeToString()
            await expect(client, "Register", raw, grpc.StatusCode.PERMISSION_DENIED,
                         "unknown_key")
        raw = seal(Identity.generate(), "Register", register_payload("mjt_nope.x"))
        await expect(client, "Register", raw.SerializeToString(),
                     grpc.StatusCode.PERMISSION_DENIED, "token_invalid")
        assert len(cache) == before
        raw = seal(good, "Register", register_payload()).SerializeToString()
        await client.call_raw("Register", raw)
        assert len(cache) == before + 1  # a trusted key's nonce is recorded
        await expect(client, "Register", raw, grpc.StatusCode.UNAUTHENTICATED, "replayed_nonce")
        await client.close()
