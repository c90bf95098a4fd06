"""The simulator's MoE scenario: expert statistics steer the decode pick, and the hit figure."""

from __future__ import annotations

import itertools

import pytest

from meshd.scheduler.sim import ClusterConfig, Simulator, TraceRequest
from meshd.scheduler.sim.moe import best_workers, expert_hits, moe_trace
from meshd.scheduler.sim.policies import build
from meshd.scheduler.sim.timing import linear

COST = linear(prefill_s_per_token=0.0001, decode_step_s=0.001, transfer_s_per_token=0.00001)
ALL, LOW, HIGH = frozenset(range(8)), frozenset(range(4)), frozenset(range(4, 8))


def make_cluster(a: frozenset[int] = LOW, b: frozenset[int] = HIGH) -> ClusterConfig:
    return ClusterConfig.disaggregated(1, 2, cost=COST, block_size=16, kv_tokens=200_000,
                                       experts=(ALL, a, b))


@pytest.mark.parametrize(("experts", "hosted", "want"), [
    ({1: 10, 5: 30}, {"a": LOW, "b": HIGH}, {"b"}),
    ({1: 30, 5: 30}, {"a": LOW, "b": HIGH}, {"a", "b"}),  # a tie: both are best
    ({1: 10}, {"a": LOW, "c": frozenset()}, {"a", "c"}),  # an empty set hosts all
    ({}, {"a": LOW}, set()),
])
def test_best_workers(experts: dict[int, int], hosted: dict[str, frozenset[int]],
                      want: set[str]) -> None:
    assert best_workers(experts, hosted) == want


def test_moe_trace_routes_the_hot_share_to_the_topic_experts() -> None:
    trace = moe_trace(50, 10.0, topics=2, hot_experts=4, hot_share=0.75, seed=3)
    assert [r.request_id for r in trace] == [f"moe-{i}" for i in range(50)]
    assert all(b.arrival_s > a.arrival_s for a, b in itertools.pairwise(trace))
    for r in trace:
        counts = dict(r.experts)
        routed = 2 * r.input_tokens  # top-2 routing
        assert sum(counts.values()) == routed
        hot = max(sum(counts.get(e, 0) for e in range(4)),
                  sum(counts.get(e, 0) for e in range(4, 8)))
        assert hot == int(routed * 0.75) // 4 * 4  # each hot expert: an equal part of 75%
    assert moe_trace(50, 10.0, seed=3) == moe_trace(50, 10.0, seed=3)


def test_experts_steer_decode_and_swapping_the_placement_swaps_the_worker() -> None:
    # w01 hosts experts 0-3, w02 4-7: a request routed mostly to expert 6 decodes on w02
    trace = [TraceRequest("r0", 0.0, 600, 4, experts=((1, 100), (6, 1100))),
             TraceRequest("r1", 1.0, 600, 4, experts=((2, 1000), (6, 200)))]
    decoded = {}
    for a, b in ((LOW, HIGH), (HIGH, LOW)):
        router, index = build("meshd")
        cluster = make_cluster(a, b)
        result = Simulator(cluster, router, index).run(trace)
        decoded[a == LOW] = [r.decode_worker for r in result.records]
        assert expert_hits(result, trace, cluster) == (2, 2)
    assert decoded == {True: ["w02", "w01"], False: ["w01", "w02"]}


def test_expert_hit_rate_meshd_against_round_robin() -> None:
    trace = moe_trace(200, 5.0, topics=2, hot_experts=4, prompt_tokens=(600, 1200),
                      output_tokens=(4, 16), seed=1)
    rates = {}
    for policy in ("meshd", "round_robin"):
        router, index = build(policy)
        result = Simulator(make_cluster(), router, index).run(trace)
        hits = expert_hits(result, trace, make_cluster())
        assert hits.requests == 200
        rates[policy] = hits.rate
    assert rates["meshd"] == 1.0
    assert 0.35 < rates["round_robin"] < 0.65  # alternates regardless of experts


def test_cluster_experts_need_one_set_per_worker() -> None:
    with pytest.raises(ValueError, match=r"cluster\.experts: one set per worker"):
        ClusterConfig.colocated(2, experts=(ALL,))
