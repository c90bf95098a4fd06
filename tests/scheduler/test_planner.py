"""P/D ratio planner: choice on workloads whose answer a sweep gives, hysteresis, calibration,
the strict CSV loader, config validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from meshd.scheduler.planner import (
    CandidateScore,
    Hysteresis,
    Plan,
    Planner,
    PlannerConfig,
    candidate_splits,
    median_cost,
    timing_from_cost,
)
from meshd.scheduler.sim.csv_trace import load_csv_trace, parse_csv_trace, write_csv_trace
from meshd.scheduler.sim.timing import h100_llama3_8b
from meshd.scheduler.sim.trace import TraceRequest
from meshd.scheduler.workload_stats import WorkloadStats, sample_workload


def make_quantiles(median: int) -> tuple[tuple[float, int], ...]:
    return ((0.0, max(1, median // 2)), (0.5, median), (1.0, median * 2))


def make_stats(rate: float, prompt: int, output: int, **kw: float) -> WorkloadStats:
    return WorkloadStats(rate, make_quantiles(prompt), make_quantiles(output), **kw)


LONG_PROMPTS = make_stats(50.0, 2000, 20)  # prefill-bound
LONG_OUTPUTS = make_stats(60.0, 200, 800)  # decode-bound (with a 30 ms ITL target)


def test_long_prompts_short_outputs_favour_prefill_workers() -> None:
    planner = Planner(PlannerConfig(total_workers=4, sample_requests=150))
    plan = planner.plan(LONG_PROMPTS)
    sweep = {s: planner.evaluate(LONG_PROMPTS, s) for s in candidate_splits(4)}
    best = max(sweep.values(), key=lambda c: (c.goodput, -c.slo_load))
    assert plan.split == best.split == (3, 1, 0)
    assert plan.candidates == tuple(sweep.values())
    assert plan.predicted_goodput > 1.1 * sweep[(0, 0, 4)].goodput  # a clear win, not a tie
    assert "best predicted goodput" in plan.reason


def test_short_prompts_long_outputs_favour_decode_or_colocated() -> None:
    planner = Planner(PlannerConfig(total_workers=4, sample_requests=300, itl_s=0.03))
    plan = planner.plan(LONG_OUTPUTS)
    p, d, c = plan.split
    assert c == 4 or d > p
    assert plan.score_of((3, 1, 0)).goodput < 0.9 * plan.predicted_goodput  # type: ignore[union-attr]


def test_plan_is_deterministic_and_seeded() -> None:
    a = Planner(PlannerConfig(total_workers=3, sample_requests=60)).plan(LONG_PROMPTS)
    b = Planner(PlannerConfig(total_workers=3, sample_requests=60)).plan(LONG_PROMPTS)
    assert a == b
    assert sample_workload(LONG_PROMPTS, 50, 1) != sample_workload(LONG_PROMPTS, 50, 2)


def test_sampled_workload_follows_the_stats() -> None:
    trace = sample_workload(make_stats(10.0, 1000, 100, prefix_hit_ratio=0.5), 2000, 0)
    rate = (len(trace) - 1) / trace[-1].arrival_s
    assert 9.0 < rate < 11.0
    assert all(500 <= r.input_tokens <= 2000 and 50 <= r.output_tokens <= 200 for r in trace)
    assert sorted(r.input_tokens for r in trace)[1000] == pytest.approx(1000, rel=0.05)
    stats = WorkloadStats.from_requests(trace, trace[-1].arrival_s)
    assert stats.prompt_tokens[0][1] >= 500 and stats.peak_rate_rps < 2 * stats.arrival_rate_rps


def test_bursty_sample_keeps_the_mean_and_peaks() -> None:
    stats = make_stats(10.0, 1000, 100, peak_rate_rps=25.0, burst_s=2.0)
    trace = sample_workload(stats, 4000, 0)
    assert (len(trace) - 1) / trace[-1].arrival_s == pytest.approx(10.0, rel=0.1)
    first_burst = sum(1 for r in trace if r.arrival_s < 2.0)
    assert 35 <= first_burst <= 65  # 25 r/s for 2 s, then calm at 5 r/s
    seen = WorkloadStats.from_requests(trace, trace[-1].arrival_s, burst_s=2.0)
    assert seen.peak_rate_rps >= 20.0


def test_calibrated_step_times_change_the_choice() -> None:
    base = h100_llama3_8b()
    cfg = PlannerConfig(total_workers=4, sample_requests=150)
    planner = Planner(cfg)
    assert planner.plan(LONG_PROMPTS).split == (3, 1, 0)
    measured = [{"prefill_ms_per_token": 0.009, "decode_base_ms": 7.8},
                {"prefill_ms_per_token": 0.011, "decode_base_ms": 8.0},
                {"prefill_ms_per_token": 0.010}]
    fast_prefill = timing_from_cost(median_cost(measured), base)
    assert fast_prefill.view_params()["prefill_ms_per_token"] == pytest.approx(0.010)
    assert fast_prefill.decode_overhead_s == pytest.approx(0.0079)
    planner.set_timing(fast_prefill)
    assert planner.plan(LONG_PROMPTS).split != (3, 1, 0)


def test_timing_from_cost_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="prefill_ms_per_tok"):
        timing_from_cost({"prefill_ms_per_tok": 1.0}, h100_llama3_8b())


# -- hysteresis (fed synthetic plans: no simulation) ---------------------------------------------
def make_plan(scores: dict[tuple[int, int, int], float]) -> Plan:
    cands = tuple(CandidateScore(*s, g, 1.0, 0.1, 0.01, 0.5) for s, g in scores.items())
    best = max(cands, key=lambda c: c.goodput)
    return Plan(*best.split, best.goodput, cands, "test")


A, B = (2, 2, 0), (3, 1, 0)
FAVOUR_A = make_plan({A: 10.0, B: 9.5})
FAVOUR_B_NOISE = make_plan({A: 9.6, B: 10.0})  # B ahead by 4%: below the 10% gain
FAVOUR_B = make_plan({A: 8.0, B: 10.0})  # B ahead by 25%


def make_hysteresis(confirm: int = 3, cooldown: int = 2, smoothing: float = 1.0) -> Hysteresis:
    return Hysteresis(min_gain=0.1, confirm_windows=confirm, cooldown_windows=cooldown,
                      smoothing=smoothing)


def test_noisy_alternation_does_not_flip() -> None:
    h = make_hysteresis(confirm=1, cooldown=0)
    splits = [h.step(p).split for p in [FAVOUR_A, FAVOUR_B_NOISE] * 10]
    assert set(splits) == {A} and h.changes == 0
    h2 = make_hysteresis(confirm=3, cooldown=0)  # large alternating wins: never 3 in a row
    splits = [h2.step(p).split for p in [FAVOUR_A, FAVOUR_B, FAVOUR_B] * 5]
    assert set(splits) == {A} and h2.changes == 0
    h3 = make_hysteresis(confirm=2, cooldown=0, smoothing=0.5)  # smoothed: B +8% on average
    splits = [h3.step(p).split for p in [FAVOUR_A, FAVOUR_B] * 10]
    assert set(splits) == {A} and h3.changes == 0


def test_smoothing_adopts_an_intermittent_but_sustained_win() -> None:
    big, small = make_plan({A: 2.0, B: 10.0}), make_plan({A: 9.8, B: 10.0})
    raw = make_hysteresis(confirm=3, cooldown=0)
    raw.step(FAVOUR_A)
    assert {raw.step(p).split for p in [big, small] * 3} == {A}  # every small window resets
    h = make_hysteresis(confirm=3, cooldown=0, smoothing=0.5)
    h.step(FAVOUR_A)
    assert [h.step(p).split for p in [big, small] * 3] == [A, A, B, B, B, B]
    assert h.smoothed[A] < h.smoothed[B] and h.changes == 1


def test_sustained_shift_adopted_after_confirm_windows() -> None:
    h = make_hysteresis(confirm=3, cooldown=0)
    assert h.step(FAVOUR_A).split == A
    got = [h.step(FAVOUR_B) for _ in range(4)]
    assert [p.split for p in got] == [A, A, B, B]
    assert "2/3 windows" in got[1].reason and got[2].reason.startswith("adopted 3P1D over 2P2D")
    assert got[0].predicted_goodput == 8.0  # the plan in force, re-scored by the fresh window
    assert h.changes == 1


def test_cooldown_respected() -> None:
    h = make_hysteresis(confirm=1, cooldown=2)
    h.step(FAVOUR_A)  # the initial plan starts a cooldown too
    back = make_plan({A: 10.0, B: 8.0})
    steps = [FAVOUR_B] * 3 + [back] * 3
    assert [h.step(p).split for p in steps] == [A, A, B, B, B, A]
    assert "cooldown" in h.step(FAVOUR_B).reason and h.changes == 2


def test_seeded_deployment_has_no_cooldown_and_trailing_challenger_waits() -> None:
    h = make_hysteresis(confirm=1, cooldown=5, smoothing=0.5)
    h.seed(A)
    assert h.step(FAVOUR_B).split == B and h.changes == 1  # no cooldown after a seed
    h2 = make_hysteresis(confirm=2, cooldown=0, smoothing=0.2)
    h2.seed(A)
    h2.step(make_plan({A: 1.0, B: 10.0}))  # smoothed B far ahead ...
    kept = h2.step(make_plan({A: 10.0, B: 2.0}))  # ... but behind in this window: no change
    assert kept.split == A and "trails in this window" in kept.reason


def test_reasons_say_when_there_is_no_goodput() -> None:
    h = make_hysteresis(confirm=2, cooldown=0)
    h.seed(B)
    kept = h.step(make_plan({A: 0.0, B: 0.0}))  # nothing meets the SLO: no gain to speak of
    assert kept.split == B and "no split has goodput" in kept.reason and "inf" not in kept.reason
    rising = h.step(make_plan({A: 5.0, B: 0.0}))  # A from nothing: counted, said in words
    assert rising.split == B and "from no goodput (1/2 windows)" in rising.reason
    adopted = h.step(make_plan({A: 5.0, B: 0.0}))
    assert adopted.split == A and "from no goodput" in adopted.reason
    assert "inf" not in rising.reason + adopted.reason


def test_deployed_must_match_total() -> None:
    with pytest.raises(ValueError, match="deployed"):
        Planner(PlannerConfig(total_workers=4), deployed=(1, 1, 1))


def test_observe_goes_through_hysteresis() -> None:
    planner = Planner(PlannerConfig(total_workers=3, sample_requests=40, confirm_windows=2))
    first = planner.observe(LONG_PROMPTS)
    assert first.reason.startswith("initial") and planner.hysteresis.in_force == first


# -- CSV loader -------------------------------------------------------------------------------
def test_csv_round_trip(tmp_path: Path) -> None:
    reqs = [TraceRequest(f"c{i}", 0.25 * i, 100 + i, 1 + i) for i in range(5)]
    path = tmp_path / "t.csv"
    write_csv_trace(path, reqs)
    assert load_csv_trace(path) == reqs
    assert [r.arrival_s for r in load_csv_trace(path, speedup=2.0, limit=3)] == [0, 0.125, 0.25]


def test_csv_header_order_comments_and_sorting() -> None:
    lines = ["# comment", "Output_Tokens,timestamp,input_tokens,extra", "0,10.5,7,x", "",
             "3,10.0,8,y"]
    got = parse_csv_trace(lines)
    assert [(r.arrival_s, r.input_tokens, r.output_tokens) for r in got] == [(0.0, 8, 3),
                                                                              (0.5, 7, 1)]


@pytest.mark.parametrize(("row", "message"), [
    ("1.0,abc,3", "t.csv:3: input_tokens: expected a number, got 'abc'"),
    ("1.0,10", "t.csv:3: expected 3 columns"),
    ("-1,10,3", "t.csv:3: timestamp: must be a finite number >= 0"),
    ("1.0,0,3", "t.csv:3: input_tokens: must be >= 1"),
    ("1.0,10,-2", "t.csv:3: output_tokens: must be >= 0"),
    ("1.0,10.5,2", "t.csv:3: input_tokens: expected an integer"),
    ("nan,10,2", "t.csv:3: timestamp: must be a finite number"),
])
def test_csv_bad_lines_named(row: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_csv_trace(["timestamp,input_tokens,output_tokens", "0,5,5", row], "t.csv")


def test_csv_needs_header() -> None:
    with pytest.raises(ValueError, match=r"t\.csv:1: header must name .* missing timestamp"):
        parse_csv_trace(["0,5,5"], "t.csv")
    with pytest.raises(ValueError, match="empty trace"):
        parse_csv_trace([], "t.csv")


# -- validation -------------------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value"), [
    ("total_workers", 0), ("ttft_s", 0.0), ("itl_s", -1.0), ("goodput", "tokens"),
    ("min_gain", -0.1), ("confirm_windows", 0), ("cooldown_windows", -1), ("smoothing", 0.0),
    ("sample_requests", 5), ("kv_tokens", 100), ("host_cache_tokens", -1),
])
def test_bad_config_names_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"planner.{field}"):
        dataclasses.replace(PlannerConfig(total_workers=4), **{field: value})


@pytest.mark.parametrize(("kw", "field"), [
    ({"arrival_rate_rps": 0.0}, "arrival_rate_rps"), ({"peak_rate_rps": 5.0}, "peak_rate_rps"),
    ({"burst_s": 0.0}, "burst_s"),
    ({"prefix_hit_ratio": 1.0}, "prefix_hit_ratio"),
    ({"prompt_tokens": ((0.5, 10), (0.2, 20))}, "prompt_tokens"),
    ({"output_tokens": ((0.5, 0),)}, "output_tokens"), ({"prompt_tokens": ()}, "prompt_tokens"),
])
def test_bad_stats_names_field(kw: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"stats.{field}"):
        dataclasses.replace(LONG_PROMPTS, **kw)
