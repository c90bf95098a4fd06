"""The simulator against scenarios computed by hand (linear cost model, no overheads)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from meshd.scheduler.profiles import builtin
from meshd.scheduler.router import Router
from meshd.scheduler.sim import ClusterConfig, Simulator, TraceRequest, ideal_hit_rate, summarize
from meshd.scheduler.sim.sim import SimResult
from meshd.scheduler.sim.timing import linear
from meshd.scheduler.types import Decision, RequestView, WorkerView

# prefill 1 ms per uncached token, a decode step 10 ms, a transfer 0.1 ms per token
COST = linear(prefill_s_per_token=0.001, decode_step_s=0.01, transfer_s_per_token=0.0001)


def make_cluster(n: int = 2) -> ClusterConfig:
    return ClusterConfig.colocated(n, cost=COST, block_size=512, kv_tokens=100_000,
                                   token_budget=10_000)


def make_trace() -> list[TraceRequest]:
    return [TraceRequest("a", 0.0, 1024, 3, (1, 2)),
            TraceRequest("b", 0.5, 1024, 2, (3, 4)),
            TraceRequest("c", 1.0, 1536, 2, (1, 2, 5))]


def run_round_robin() -> SimResult:
    return Simulator(make_cluster(), Router(decode=builtin("round_robin"))).run(make_trace())


def test_round_robin_three_requests_by_hand() -> None:
    # a -> w00 at 0: prefill 1024 tok = 1.024 s -> first token 1.024.
    # b -> w01 at 0.5: prefill 1.024 s -> first token 1.524, one decode step -> end 1.534.
    # c -> w00 at 1.0 waits for a's prefill; at 1.024 it hits a's 2 blocks (1024 tokens) and
    #   prefills 512 tokens in a mixed iteration with a's decode step: 0.512 + 0.010 -> 1.546.
    #   a: token 2 at 1.546; then one decode step for a and c -> both end at 1.556.
    res = run_round_robin()
    a, b, c = res.records
    expect = {  # id: (worker, prefill_start, first_token, end, cached)
        "a": ("w00", 0.0, 1.024, 1.556, 0),
        "b": ("w01", 0.5, 1.524, 1.534, 0),
        "c": ("w00", 1.024, 1.546, 1.556, 1024),
    }
    for r in (a, b, c):
        worker, start, first, end, cached = expect[r.request_id]
        assert (r.prefill_worker, r.decode_worker, r.disaggregated) == (worker, worker, False)
        assert r.prefill_start_s == pytest.approx(start)
        assert r.first_token_s == pytest.approx(first)
        assert r.end_s == pytest.approx(end)
        assert r.cached_tokens == cached
    assert [(g, n) for g, n in a.itl] == [(pytest.approx(0.522), 1), (pytest.approx(0.010), 1)]
    assert c.ttft_s == pytest.approx(0.546)
    assert res.workers["w00"].busy_s == pytest.approx(1.556)
    assert res.workers["w01"].busy_s == pytest.approx(1.034)
    assert (res.workers["w00"].prefill_tokens, res.workers["w00"].decode_tokens) == (1536, 3)
    assert not res.truncated


def test_summary_of_hand_scenario() -> None:
    trace = make_trace()
    s = summarize(run_round_robin(), trace)
    assert s.hit_rate == pytest.approx(1024 / 3584)
    assert s.ideal_hit_rate == pytest.approx(1024 / 3584)
    # a's mean ITL is (1.556 - 1.024) / 2 = 0.266 s > 0.1 s: only b and c meet the SLO
    assert s.completed == 3 and s.slo_attainment == pytest.approx(2 / 3)
    assert s.makespan_s == pytest.approx(1.556)
    assert s.goodput_rps == pytest.approx(2 / 1.556)
    assert s.ttft_p50_s == pytest.approx(1.024)
    assert s.imbalance_busy == pytest.approx(1.556 / ((1.556 + 1.034) / 2))


class FixedPolicy:
    """Always prefill on `p`, decode on `d`."""

    def __init__(self, p: str, d: str) -> None:
        self.p, self.d = p, d

    def decide(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision:
        return Decision(self.p, self.d, self.p != self.d, 0)


def test_disaggregated_request_by_hand() -> None:
    # P=w00 prefills 1024 tokens: first token at 1.024; 1024 tokens move at 0.1 ms each:
    # 1.024 + 0.1024 = 1.1264; D=w01 runs 2 decode steps: 1.1364, 1.1464.
    trace = [TraceRequest("a", 0.0, 1024, 3, (1, 2))]
    res = Simulator(make_cluster(), FixedPolicy("w00", "w01")).run(trace)
    (a,) = res.records
    assert a.disaggregated and a.transfer_tokens == 1024
    assert a.first_token_s == pytest.approx(1.024)
    assert a.end_s == pytest.approx(1.1464)
    assert a.itl[0][0] == pytest.approx(0.1124)
    assert res.workers["w00"].decode_tokens == 0 and res.workers["w01"].decode_tokens == 2


def test_decode_side_cache_shortens_transfer() -> None:
    # the second request shares both blocks, which D already holds from the first one
    trace = [TraceRequest("a", 0.0, 1024, 2, (1, 2)), TraceRequest("b", 5.0, 1100, 2, (1, 2, 9))]
    res = Simulator(make_cluster(), FixedPolicy("w00", "w01")).run(trace)
    assert [r.transfer_tokens for r in res.records] == [1024, 1100 - 1024]
    assert res.records[1].cached_tokens == 1024  # P hit too


def test_ideal_hit_rate_tiny_trace() -> None:
    trace = [TraceRequest("x", 0, 2048, 1, (1, 2, 3, 4)),
             TraceRequest("y", 1, 1600, 1, (1, 2, 7, 8)),  # 2 blocks of x: 1024
             TraceRequest("z", 2, 1100, 1, (1, 2, 7))]  # 2 full blocks of y: 1024
    assert ideal_hit_rate(trace, 512) == pytest.approx(2048 / (2048 + 1600 + 1100))
    # at 16-token blocks z also reuses y's partial third block: 1100 // 16 = 68 blocks,
    # y holds blocks of (1, 2, 7) up to 1600 tokens, so all 68 match: 1088 tokens
    assert ideal_hit_rate(trace, 16) == pytest.approx((1024 + 1088) / (2048 + 1600 + 1100))


class _Recorder:
    """Round-robin that records what each decision saw."""

    def __init__(self) -> None:
        self.router = Router(decode=builtin("round_robin"))
        self.seen: dict[str, tuple[tuple[int, ...], object]] = {}

    def decide(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision:
        self.seen[request.request_id] = (tuple(w.num_waiting_tokens for w in workers),
                                         workers[0].cost)
        return self.router.decide(request, workers)


def test_views_report_queued_prefill_tokens_and_the_cost_model() -> None:
    # b arrives while w00 prefills a's 1024 tokens (done at 1.024); c while w00 still does and
    # w01 prefills b's; the SLO scorer gets the simulator's own cost model
    rec = _Recorder()
    sim = Simulator(make_cluster(), rec)
    sim.run(make_trace())
    assert {k: v[0] for k, v in rec.seen.items()} == {"a": (0, 0), "b": (1024, 0),
                                                      "c": (1024, 1024)}
    assert all(v[1] == COST.view_params(8192) for v in rec.seen.values())
    for w in sim.workers:
        w.check_integrity()
        assert w.queued_tokens == 0
