"""The routing set carries each worker's node attributes and expert placement to the pool:
agent report -> signed registration -> `routable_workers` -> registry dicts -> `WorkerFacts`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from support.control import control_server, make_config, wait_for

from meshd import capabilities as caps
from meshd.config import AgentConfig, ConfigError, load
from meshd.coordinator.gateway.config import RoutingConfig
from meshd.coordinator.gateway.workers.members import configured_cost, facts_of
from meshd.node_agent.agent import Agent
from meshd.node_agent.identity import Identity
from meshd.scheduler.types import Role
from meshd.scheduler.views import WorkerFacts

W0 = caps.Worker("w0", "http://127.0.0.1:8100", "decode", "moe", kv_block_size=32,
                 kv_capacity_blocks=512)
W1 = caps.Worker("w1", "http://127.0.0.1:8110", "decode", "moe")
EXPERTS = (caps.Experts("moe", "w0", 0, (0, 1, 2, 3)), caps.Experts("moe", "w0", 1, (1, 2, 3)),
           caps.Experts("moe", "w1", 0, (4, 5, 6, 7)))


def make_report() -> caps.Capabilities:
    return caps.Capabilities(host=caps.Host("gpu-1", 2, 8 << 30), workers=(W0, W1),
                             experts=EXPERTS, attributes={"zone": "eu-1", "privacy": "high"})


async def test_routing_set_carries_attributes_and_experts_of_ready_workers(
        state_dir: Path) -> None:
    async with control_server(make_config(state_dir)) as run:
        ident = Identity.generate()  # its privacy class is the one the operator pinned
        run.store.add_key(ident.public_key, ident.node_id, pinned_attrs={"privacy": "high"})
        cfg = AgentConfig(coordinator=run.address, rpc_timeout_s=2.0)
        agent = Agent(cfg, ident, make_report, workers=lambda: (W0,))  # w1 not ready yet
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            await wait_for(lambda: agent.status.registered)
            members = run.server.plane.routable_workers()
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)
    assert members == [caps.Member(ident.node_id, W0, {"zone": "eu-1", "privacy": "high"},
                                   EXPERTS[:2])]
    rows = [caps.member_to_dict(m) for m in members]  # what the registry actor answers
    assert [caps.member_from_dict(r) for r in rows] == members


def test_facts_of_a_member() -> None:
    m = caps.members("n1", make_report())[0]
    cost = configured_cost(RoutingConfig(cost={"*": {"decode_base_ms": 3}}), "moe")
    assert facts_of(m, cost) == WorkerFacts(
        "w0", Role.DECODE, "moe", node_id="n1", block_size=32, kv_capacity_blocks=512,
        experts=frozenset({1, 2, 3}),  # hosted in every layer
        attributes={"zone": "eu-1", "privacy": "high"}, cost={"decode_base_ms": 3.0})
    assert facts_of(caps.members("n1", make_report())[1], {}).experts == {4, 5, 6, 7}
    assert facts_of(caps.Member("static", W1), {}).experts == frozenset()  # hosts all


def test_configured_cost_per_model_then_star() -> None:
    r = RoutingConfig(cost={"a": {"prefill_ms_per_token": 0.5}, "*": {"decode_base_ms": 2}})
    assert configured_cost(r, "a") == {"prefill_ms_per_token": 0.5}
    assert configured_cost(r, "b") == {"decode_base_ms": 2.0}
    assert configured_cost(RoutingConfig(), "a") == {}


async def test_agent_daemon_reports_its_expert_placement_to_the_pool(tmp_path: Path) -> None:
    """`[workers] moe = true, experts = ["*", "0-3"]` on a real agent with real MoE worker
    processes: the routing set carries the placement and the pool's views host it."""
    import dataclasses

    from support.net import free_port

    from meshd.config import MeshConfig, WorkersConfig
    from meshd.coordinator.gateway.workers.pool import WorkerPool
    from meshd.node_agent import daemon

    async with control_server(make_config(tmp_path / "coord")) as run:
        ident = Identity.generate()
        run.store.add_key(ident.public_key, ident.node_id)
        cfg = dataclasses.replace(
            MeshConfig(),
            agent=AgentConfig(coordinator=run.address, state_dir=str(tmp_path / "agent"),
                              host="127.0.0.1", attributes={"zone": "z1"}, rpc_timeout_s=2.0,
                              reconnect_max_backoff_s=0.5),
            workers=WorkersConfig(prefill=1, decode=1, moe=True, model_name="meshd-tiny-moe",
                                  experts=("*", "0-3"), base_port=free_port(), num_blocks=64))
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(cfg, ident, stop))
        try:
            await wait_for(lambda: len(run.server.plane.routable_workers()) == 2, 90)
            routed = run.server.plane.routable_workers()
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
    p, d = f"{ident.node_id}-p0", f"{ident.node_id}-d1"
    assert {m.worker.worker_id: len(m.experts) for m in routed} == {p: 0, d: 4}  # 4 layers
    pool = WorkerPool(follow_events=False)
    pool.update(caps.member_from_dict(caps.member_to_dict(m)) for m in routed)
    views = {v.worker_id: v for v in pool.views()}
    await pool.close()
    assert (views[p].experts, views[d].experts) == (frozenset(), frozenset({0, 1, 2, 3}))
    assert views[d].attributes == {"zone": "z1"} and views[d].node_id == ident.node_id


@pytest.mark.parametrize(("toml", "want"), [
    ('[gateway.routing.cost.moe]\nprefill_ms_per_token = 0.05\n',
     {"moe": {"prefill_ms_per_token": 0.05}}),
    ('[gateway.routing.cost."*"]\ndecode_base_ms = 9\n', {"*": {"decode_base_ms": 9}}),
    ('[gateway.routing.cost.moe]\nprefill_ms = 1\n',
     "gateway.routing.cost.moe: cost model: unknown parameters ['prefill_ms'] (valid: "),
    ('[gateway.routing.cost.moe]\ndecode_base_ms = -1\n',
     "gateway.routing.cost.moe.decode_base_ms: must be a number >= 0, got -1"),
    ('[gateway.routing]\ncost = {moe = 3}\n',
     "gateway.routing.cost.moe: must be a table of cost-model parameters"),
])
def test_routing_cost_config(tmp_path: Path, toml: str, want: object) -> None:
    f = tmp_path / "meshd.toml"
    f.write_text(toml)
    if isinstance(want, str):
        with pytest.raises(ConfigError) as e:
            load(f, environ={})
        assert str(e.value).startswith(want)
    else:
        assert load(f, environ={}).gateway.routing.cost == want
