"""The pool's own queued-prefill estimate and the cost calibration windows, table-driven."""

from __future__ import annotations

import pytest

from meshd.coordinator.gateway.workers.calibration import Calibration, window
from meshd.coordinator.gateway.workers.load import WorkerLoad
from meshd.coordinator.gateway.workers.prefill_ledger import PrefillLedger
from meshd.scheduler.cost_model import CostModel


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_ledger_start_done_drop_expire() -> None:
    clock = Clock()
    led = PrefillLedger(ttl_s=10.0, clock=clock)
    a, b = led.start("w0", 100), led.start("w0", 50)
    c = led.start("w1", 0)  # nothing to prefill (fully cached): counted as nothing
    clock.t = 5.0
    d = led.start("w1", 70)
    assert (led.tokens("w0"), led.tokens("w1")) == (150, 70)
    assert led.done(a) == "w0" and led.done(a) is None and led.done(999) is None
    assert led.done(c) == "w1" and led.tokens("w1") == 70
    clock.t = 12.0  # b (t=0) is past ttl, d (t=5) is not
    assert led.expire() == {"w0"} and led.tokens("w0") == 0 and led.done(b) is None
    led.check_integrity()
    led.drop_worker("w1")
    assert led.tokens("w1") == 0 and led.done(d) is None
    led.check_integrity()


BASE = CostModel(prefill_fixed_ms=4.0, decode_ms_per_seq=0.5, decode_ms_per_kctx=0.0)


@pytest.mark.parametrize(("prev", "cur", "want"), [
    # 4 prefills, 0.416 s, 4000 prompt tokens of which 2000 cached: (416 - 16) / 2000
    (WorkerLoad(), WorkerLoad(prefill_s_sum=0.416, prefill_count=4,
                              request_prompt_tokens_sum=4000, prefix_hits=2000),
     {"prefill_ms_per_token": 0.2}),
    # nearly all cached in the window (hits counted at scheduling): skipped
    (WorkerLoad(), WorkerLoad(prefill_s_sum=0.1, prefill_count=1,
                              request_prompt_tokens_sum=1000, prefix_hits=950), {}),
    # 8 gaps of 12 ms at 2 running: 12 - 0.5 x 2
    (WorkerLoad(itl_s_sum=1.0, itl_count=10),
     WorkerLoad(num_running=2, itl_s_sum=1.096, itl_count=18), {"decode_base_ms": 11.0}),
    (WorkerLoad(itl_count=10), WorkerLoad(itl_count=12, itl_s_sum=1.0), {}),  # too few gaps
    (WorkerLoad(prefill_count=9), WorkerLoad(prefill_count=2), {}),  # the worker restarted
])
def test_calibration_window(prev: WorkerLoad, cur: WorkerLoad, want: dict[str, float]) -> None:
    got = window(prev, cur, BASE, context_tokens=0)
    assert got == pytest.approx(want) and set(got) == set(want)


def test_calibration_publishes_only_material_changes() -> None:
    cal = Calibration(alpha=0.5, tolerance=0.1)
    loads = [WorkerLoad(itl_s_sum=0.010 * n, itl_count=n, num_running=1) for n in (0, 10, 20)]
    assert not cal.observe(loads[0], BASE, 0)  # first scrape: nothing to compare
    assert cal.observe(loads[1], BASE, 0) and cal.published == {"decode_base_ms": 9.5}
    assert not cal.observe(loads[2], BASE, 0)  # same figure again
    slow = WorkerLoad(itl_s_sum=0.2 + 0.030 * 20, itl_count=40, num_running=1)  # 30 ms gaps
    assert cal.observe(slow, BASE, 0)
    assert cal.published["decode_base_ms"] == pytest.approx((9.5 + 29.5) / 2)
