"""Role changes through the real control plane (gRPC on loopback): an admin asks, the worker
leaves the routing set at once, the agent is told in its heartbeats until it acknowledges, and
every refusal has its status and reason. The role book as plain data, and the embedded
worker's respec, are checked here too."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import grpc
import pytest
from support.control import control_server, make_config, make_report, wait_for

from meshd import capabilities as caps
from meshd.config import AgentConfig
from meshd.coordinator.roles import RoleBook
from meshd.node_agent.agent import Agent
from meshd.node_agent.client import ControlClient, ControlError
from meshd.node_agent.identity import Identity
from meshd.node_agent.launcher import respec
from meshd.node_agent.supervisor import WorkerSpec
from meshd.proto.v1 import control_pb2 as pb


def make_worker(wid: str, role: str, engine: str = "embedded") -> caps.Worker:
    return caps.Worker(wid, f"http://127.0.0.1:{8100 + int(wid[-1]) * 10}", role, "tiny",
                       engine=engine, kv_block_size=16)


def test_the_role_book_keeps_asks_until_acknowledged() -> None:
    book = RoleBook()
    a = book.ask("n1", "n1-p0", "decode")
    b = book.ask("n1", "n1-d1", "both")
    assert (a.generation, b.generation) == (1, 2) and book.draining("n1") == {"n1-p0", "n1-d1"}
    with pytest.raises(ValueError, match="pending already"):
        book.ask("n1", "n1-p0", "both")
    book.ack("n1", 1)
    assert [x.worker_id for x in book.pending("n1")] == ["n1-d1"]
    book.check_integrity()
    book.ack("n1", 2)
    assert book.pending("n1") == [] and book.draining("n1") == set()
    assert book.ask("n1", "n1-p0", "both").generation == 3  # generations never go back
    book.forget("n1")
    assert book.pending("n1") == []
    old, new = book.ask("n2", "n2-p0", "both", now=10.0), book.ask("n2", "n2-d1", "both", 200.0)
    assert book.expire(now=310.0, max_age_s=300.0) == [("n2", old)]  # never taken: dropped
    assert book.pending("n2") == [new]
    book.check_integrity()


def test_respec_gives_the_slot_its_new_role_and_id() -> None:
    spec = WorkerSpec(make_worker("node-p0", "prefill"),
                      ("meshd", "engine", "serve", "--role", "prefill", "--engine-id",
                       "node-p0", "--port", "8100"), "http://127.0.0.1:8100/health")
    new = respec(spec, "decode")
    assert new is not None and new.worker.worker_id == "node-d0"
    assert new.worker.role == "decode" and new.worker.endpoint == spec.worker.endpoint
    assert new.argv == ("meshd", "engine", "serve", "--role", "decode", "--engine-id",
                        "node-d0", "--port", "8100")
    vllm = dataclasses.replace(spec, worker=make_worker("node-p0", "prefill", "vllm"))
    assert respec(vllm, "decode") is None  # a vLLM worker without a connector config
    other = dataclasses.replace(spec, worker=make_worker("node-p0", "prefill", "sglang"))
    assert respec(other, "decode") is None


async def test_an_admin_asks_and_the_agent_is_told_until_it_acknowledges(
        state_dir: Path) -> None:
    async with control_server(make_config(state_dir)) as run:
        node, admin = Identity.generate(), Identity.generate()
        run.store.add_key(node.public_key, node.node_id)
        run.store.add_key(admin.public_key, admin.node_id, role="admin")
        workers = (make_worker(f"{node.node_id}-p0", "prefill"),
                   make_worker(f"{node.node_id}-d1", "decode"),
                   make_worker(f"{node.node_id}-v2", "decode", engine="vllm"),  # no connector
                   dataclasses.replace(make_worker(f"{node.node_id}-vllm-d3", "decode", "vllm"),
                                       kv_transfer_endpoint="tcp://127.0.0.1:8133"))
        taken: list[tuple[str, str]] = []

        def rerole(worker_id: str, role: str) -> bool:
            taken.append((worker_id, role))
            return True

        cfg = AgentConfig(coordinator=run.address, rpc_timeout_s=2.0,
                          reconnect_max_backoff_s=0.5)
        agent = Agent(cfg, node, lambda: make_report("h", workers), rerole=rerole)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await wait_for(lambda: agent.status.registered)
        agent.interval_s = 0.05
        plane = run.server.plane
        client = ControlClient(run.address, admin)
        d1 = f"{node.node_id}-d1"
        try:
            reply = await client.set_role(node.node_id, d1, pb.WORKER_ROLE_BOTH)
            assert reply.generation == 1
            assert d1 not in {m.worker.worker_id for m in plane.routable_workers()}
            status = await client.status()
            assert [c.worker_id for c in status.nodes[0].pending_roles] == [d1]
            await wait_for(lambda: bool(taken))
            assert taken == [(d1, "both")]
            await wait_for(lambda: not plane.roles.pending(node.node_id))  # acknowledged
            assert agent.role_generation == 1

            async def refused(worker: str, role: int, code: grpc.StatusCode, reason: str,
                              who: ControlClient = client, node_id: str = node.node_id
                              ) -> None:
                with pytest.raises(ControlError) as e:
                    await who.set_role(node_id, worker, role)  # type: ignore[arg-type]
                assert (e.value.code, e.value.reason) == (code, reason)

            p0 = f"{node.node_id}-p0"
            await refused(p0, pb.WORKER_ROLE_PREFILL, grpc.StatusCode.FAILED_PRECONDITION,
                          "same_role")
            await refused(f"{node.node_id}-v2", pb.WORKER_ROLE_PREFILL,
                          grpc.StatusCode.UNIMPLEMENTED, "engine_cannot_rerole")
            v3 = f"{node.node_id}-vllm-d3"  # a vLLM worker with a connector: its kv_role
            assert (await client.set_role(node.node_id, v3, pb.WORKER_ROLE_BOTH)).generation
            await wait_for(lambda: (v3, "both") in taken)
            await refused("nope", pb.WORKER_ROLE_BOTH, grpc.StatusCode.NOT_FOUND,
                          "no_such_worker")
            await refused(p0, pb.WORKER_ROLE_BOTH, grpc.StatusCode.NOT_FOUND, "no_such_node",
                          node_id="n-unknown")
            await refused(p0, pb.WORKER_ROLE_UNSPECIFIED, grpc.StatusCode.INVALID_ARGUMENT,
                          "bad_role")
            await refused(p0, pb.WORKER_ROLE_BOTH, grpc.StatusCode.PERMISSION_DENIED,
                          "not_admin", who=ControlClient(run.address, node))
            await client.set_role(node.node_id, p0, pb.WORKER_ROLE_BOTH)
            await wait_for(lambda: len(taken) == 3)
            assert taken[2] == (p0, "both") and agent.role_generation == 3
        finally:
            await client.close()
            stop.set()
            await asyncio.wait_for(task, 5)
        plane.roles.check_integrity()
