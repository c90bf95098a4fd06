"""Confidence from logprobs, as plain data: the entropy estimate, the rolling window and the
halt rule, the usage summary, the config's errors."""

from __future__ import annotations

import math

import pytest

from meshd.coordinator.gateway.serving.confidence import (
    ConfidenceConfig,
    ConfidenceMeter,
    summary,
    token_confidence,
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
