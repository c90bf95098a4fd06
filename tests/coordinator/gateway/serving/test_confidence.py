"""Confidence from logprobs, as plain data: the entropy estimate, the rolling window and the
halt rule, the usage summary, the config's errors."""

from __future__ import annotations

import math

import pytest

from meshd.confidence import token_confidence
from meshd.coordinator.gateway.governance.metrics import CpuSample
from meshd.coordinator.gateway.serving.confidence import (
    ConfidenceConfig,
    ConfidenceCost,
    ConfidenceMeter,
    summary,
)


def lp(*rows: dict[str, float], sampled: list[str] | None = None) -> dict[str, object]:
    """Completions-form logprobs for positions whose top alternatives are `rows` (the first
    listed alternative sampled unless `sampled` names one)."""
    tokens = sampled or [next(iter(r)) for r in rows]
    return {"tokens": tokens, "token_logprobs": [r.get(t, math.log(1e-3))
                                                 for r, t in zip(rows, tokens, strict=True)],
            "top_logprobs": list(rows)}


def test_a_certain_token_scores_one_and_a_k_way_tie_one_over_k() -> None:
    assert token_confidence(0.0, {"a": 0.0}, "a") == pytest.approx(1.0)
    tie = {str(i): math.log(0.25) for i in range(4)}
    assert token_confidence(math.log(0.25), tie, "0") == pytest.approx(0.25)
    # mass the alternatives leave out counts as one more bucket: a 50/50 split
    assert token_confidence(math.log(0.5), {"a": math.log(0.5)}, "a") == pytest.approx(0.5)
    # a sampled token outside the alternatives adds its own mass once
    two = token_confidence(math.log(0.1), {"a": math.log(0.9)}, "z")
    assert two == pytest.approx(math.exp(0.9 * math.log(0.9) + 0.1 * math.log(0.1)))
    assert token_confidence(None, None) is None


def test_the_meter_halts_on_a_full_window_below_the_threshold() -> None:
    m = ConfidenceMeter(window=4, halt_below=0.5)
    sure = {"a": 0.0}
    flat = {str(i): math.log(0.2) for i in range(5)}
    m.observe(lp(sure, sure, sure))
    assert not m.halted() and m.rolling == pytest.approx(1.0)
    m.observe(lp(flat))  # full window: mean (3 + 0.2) / 4 = 0.8
    assert not m.halted()
    m.observe(lp(flat))  # (1 + 1 + 0.2 + 0.2) / 4 = 0.6
    assert not m.halted()
    m.observe(lp(flat))  # (1 + 0.2 * 3) / 4 = 0.4 < 0.5
    assert m.halted() and "below 0.5" in m.why()
    assert m.count == 6 and m.min == pytest.approx(0.2)
    never = ConfidenceMeter(window=1, halt_below=0.0)
    never.observe(lp(flat))
    assert not never.halted()


def test_summary_over_choices() -> None:
    a, b = ConfidenceMeter(2), ConfidenceMeter(2)
    a.add(1.0)
    a.add(0.5)
    b.add(0.3)
    s = summary([a, b])
    assert s == {"confidence_mean": pytest.approx(0.6), "confidence_min": pytest.approx(0.3),
                 "tokens_scored": 3, "halted": 0}
    assert summary([ConfidenceMeter(2)]) is None


@pytest.mark.parametrize(("kw", "msg"), [
    ({"top_logprobs": 0}, "top_logprobs"), ({"window": 0}, "window"),
    ({"halt_below": 1.0}, "halt_below"), ({"halt_below": -0.1}, "halt_below"),
])
def test_config_errors(kw: dict[str, object], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        ConfidenceConfig(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("rows", [
    [{"a": 0.0}],
    [{"a": math.log(0.5), "b": math.log(0.3)}, {"x": math.log(0.9)}],
    [{"a": math.log(0.25), "b": math.log(0.25), "c": math.log(0.25), "d": math.log(0.25)}] * 5,
])
def test_observe_scores_each_position_as_token_confidence_does(rows: list[dict[str, float]]
                                                               ) -> None:
    m = ConfidenceMeter(window=3)
    m.observe(lp(*rows))
    want = [token_confidence(r[next(iter(r))], r, next(iter(r))) for r in rows]
    assert m.count == len(rows)
    assert m.sum == pytest.approx(sum(c for c in want if c is not None))
    assert m.min == pytest.approx(min(c for c in want if c is not None))
    assert m.rolling == pytest.approx(sum(want[-3:]) / len(want[-3:]))


def test_malformed_positions_are_skipped_not_raised() -> None:
    m = ConfidenceMeter(window=4)
    m.observe({"tokens": ["a", ["unhashable"], "c", "d"],
               "token_logprobs": [-0.1, -0.2, "bogus", None],
               "top_logprobs": [{"a": -0.1}, {"b": -0.2}, {"c": -0.3}, None]})
    # a, and c from its alternatives (its own logprob is not read: c is listed); b's token is
    # unhashable, d has no logprob at all
    assert m.count == 2
    m.observe({"token_logprobs": []})
    assert m.count == 2


def test_the_replica_cost_counts_choices_and_deltas_and_times_a_sample() -> None:
    cost = ConfidenceCost()
    meters = [ConfidenceMeter(16, 0.0, cost) for _ in range(2)]
    for _ in range(CpuSample.EVERY):
        for m in meters:
            m.observe(lp({"a": -0.1}, {"b": -0.2}))
    d = cost.describe()
    assert (d["choices"], d["deltas"]) == (2, 2 * CpuSample.EVERY)
    assert d["cost_us"]["samples"] == 2
    assert d["cost_us"]["deltas_per_choice"] == CpuSample.EVERY
    assert d["cost_us"]["choice"] == pytest.approx(d["cost_us"]["observe"] * CpuSample.EVERY,
                                                   abs=0.01 * CpuSample.EVERY)


def test_a_workers_own_scores_are_added_as_they_are() -> None:
    m = ConfidenceMeter(window=2, halt_below=0.5)
    m.extend([0.9, 0.2, "bogus", 1.5, None, 0.1])  # not numbers in [0, 1]: not scored
    assert m.count == 3 and m.sum == pytest.approx(1.2) and m.min == pytest.approx(0.1)
    assert m.rolling == pytest.approx(0.15) and m.halted()
    m.extend([])
    m.extend("not a list")
    assert m.count == 3
