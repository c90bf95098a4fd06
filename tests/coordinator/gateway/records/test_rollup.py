"""The rollup histogram: exact bucket bounds, the documented quantile error, exact merges."""

from __future__ import annotations

import math
import random

import pytest

from meshd.coordinator.gateway.records.rollup import (
    HIGH_S,
    LOW_S,
    OVERFLOW,
    REL_ERROR,
    Histogram,
    Rollup,
    bucket_of,
    lower_bound,
    representative,
)


def test_bounds_are_exact() -> None:
    assert lower_bound(1) == LOW_S and lower_bound(OVERFLOW) == HIGH_S == pytest.approx(1048.576)
    for i in range(1, OVERFLOW + 1):
        lo = lower_bound(i)
        assert bucket_of(lo) == i
        assert bucket_of(math.nextafter(lo, 0.0)) == i - 1


@pytest.mark.parametrize(("v", "bucket"), [
    (0.0, 0), (-1.0, 0), (math.nan, 0), (0.000999, 0), (0.001, 1), (0.002, 9), (1.0, 80),
    (1048.0, 160), (1048.576, OVERFLOW), (math.inf, OVERFLOW),
])
def test_bucket_of(v: float, bucket: int) -> None:
    assert bucket_of(v) == bucket


def test_representative_error_bound() -> None:
    assert round(REL_ERROR, 4) == 0.0443
    rng = random.Random(7)
    for _ in range(20_000):
        v = LOW_S * 2 ** rng.uniform(0, 19.999)
        assert abs(representative(bucket_of(v)) / v - 1) <= REL_ERROR + 1e-12


def test_quantiles() -> None:
    h = Histogram()
    assert h.quantile(0.5) is None
    v = lower_bound(50) * 1.01  # below its bucket's midpoint
    h.add(v)
    assert h.quantile(0.5) == v == h.quantile(0.95)  # clamped to the max
    h.add(0.0002)
    assert h.quantile(0.5) == LOW_S / 2  # underflow bucket
    h.add(5000.0)
    assert h.quantile(1.0) == 5000.0  # overflow bucket: the max


def test_merge_equals_adding_all_and_encoding_round_trips() -> None:
    rng = random.Random(3)
    xs = [rng.lognormvariate(-1, 1) for _ in range(500)]
    a, b, both = Histogram(), Histogram(), Histogram()
    for i, x in enumerate(xs):
        (a if i % 2 else b).add(x)
        both.add(x)
    a.merge(b)
    assert a.count == both.count and a.buckets == both.buckets and a.max == both.max
    assert a.total == pytest.approx(both.total)
    back = Histogram.decode(a.count, a.total, a.max, a.encode())
    assert back == a


def test_rollup_summary() -> None:
    r = Rollup()
    r.add(True, 10, 4, 5, 0.1, 0.5)
    r.add(False, 3, 0, 0, None, 0.2)
    s = r.summary()
    assert {k: s[k] for k in ("requests", "errors", "prompt_tokens", "cached_tokens",
                              "completion_tokens", "ttft_count", "e2e_count")} == {
        "requests": 2, "errors": 1, "prompt_tokens": 13, "cached_tokens": 4,
        "completion_tokens": 5, "ttft_count": 1, "e2e_count": 2}
    assert s["ttft_max_s"] == 0.1 and s["e2e_max_s"] == 0.5
    assert s["e2e_sum_s"] == pytest.approx(0.7)
    assert Rollup().summary()["ttft_p50_s"] is None and Rollup().summary()["ttft_max_s"] is None
