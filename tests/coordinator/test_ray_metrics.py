"""The Ray metrics bridge without Ray (a recording factory): gauges set, counters advanced by
their increase (a reset added whole), every series tagged by actor, a bad sample skipped; the
throttle, the window and the histogram quantile; the registry's and the ledger's readers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from support.control import make_report

from meshd.capabilities import Worker
from meshd.coordinator.ledger_actor import LocalLedger
from meshd.coordinator.nodes import NodeTable
from meshd.coordinator.ray_figures import (
    LEDGER_SPECS,
    REGISTRY_SPECS,
    ledger_samples,
    registry_samples,
)
from meshd.coordinator.ray_metrics import (
    RayMetricsBridge,
    Sample,
    Spec,
    ThrottledCopy,
    Window,
    quantile,
)

SPECS = (Spec("g", "a gauge"), Spec("c", "a counter", "counter", ("outcome",)))


class FakeMetric:
    def __init__(self, spec: Spec, calls: list[tuple[Any, ...]]) -> None:
        self.spec, self.calls = spec, calls

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("set", self.spec.name, value, tags))

    def inc(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("inc", self.spec.name, value, tags))


def make_bridge(readings: list[list[Sample]], specs: tuple[Spec, ...] = SPECS
                ) -> tuple[RayMetricsBridge, list[tuple[Any, ...]]]:
    calls: list[tuple[Any, ...]] = []
    feed = iter(readings)
    bridge = RayMetricsBridge("meshd-x", specs, lambda: next(feed),
                              factory=lambda s: FakeMetric(s, calls))
    return bridge, calls


def test_gauges_are_set_and_counters_advance_by_their_increase() -> None:
    bridge, calls = make_bridge([
        [Sample("g", 3), Sample("c", 5, ("ok",))],
        [Sample("g", 1), Sample("c", 5, ("ok",)), Sample("c", 2, ("error",))],
        [Sample("c", 8, ("ok",))],
        [Sample("c", 3, ("ok",))],  # went down: the source restarted, add it whole
    ])
    assert [bridge.copy() for _ in range(4)] == [2, 3, 1, 1]
    ok, err = {"actor": "meshd-x", "outcome": "ok"}, {"actor": "meshd-x", "outcome": "error"}
    assert calls == [("set", "g", 3.0, {"actor": "meshd-x"}), ("inc", "c", 5, ok),
                     ("set", "g", 1.0, {"actor": "meshd-x"}), ("inc", "c", 2, err),
                     ("inc", "c", 3, ok), ("inc", "c", 3, ok)]
    assert bridge.copies == 4 and bridge.skipped == 0


@pytest.mark.parametrize("bad", [Sample("nope", 1), Sample("c", 1), Sample("g", 1, ("x",))])
def test_a_sample_matching_no_spec_is_skipped_and_counted(bad: Sample) -> None:
    bridge, calls = make_bridge([[bad, Sample("g", 2)]])
    assert bridge.copy() == 1
    assert bridge.skipped == 1 and calls == [("set", "g", 2.0, {"actor": "meshd-x"})]


async def test_run_copies_every_period_and_survives_a_failing_read() -> None:
    calls: list[tuple[Any, ...]] = []
    n = 0

    def read() -> list[Sample]:
        nonlocal n
        n += 1
        if n == 2:
            raise RuntimeError("boom")
        return [Sample("g", n)]

    bridge = RayMetricsBridge("meshd-x", SPECS, read, factory=lambda s: FakeMetric(s, calls))
    task = asyncio.create_task(bridge.run(0.01))
    while n < 4:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [c[2] for c in calls][:2] == [1.0, 3.0]


def test_throttled_copy_copies_at_most_once_a_period() -> None:
    now = [100.0]
    bridge, calls = make_bridge([[Sample("g", i)] for i in range(3)])
    throttled = ThrottledCopy(bridge, 5.0, clock=lambda: now[0])
    for t in (100.0, 101.0, 104.9, 105.0, 106.0, 111.0):
        now[0] = t
        throttled()
    assert [c[2] for c in calls] == [0.0, 1.0, 2.0]  # at 100, 105 and 111


def test_window_gives_the_increase_over_the_last_window() -> None:
    w = Window(10.0)
    assert w.delta(0.0, (5.0,)) == (5.0,)  # the first reading: everything so far
    assert w.delta(4.0, (7.0,)) == (2.0,)
    assert w.delta(10.0, (9.0,)) == (4.0,)  # the reading at 0 is exactly 10 s old
    assert w.delta(15.0, (12.0,)) == (5.0,)  # the newest at least 10 s old (at 4) is the base
    assert w.delta(100.0, (12.0,)) == (0.0,)


@pytest.mark.parametrize(("counts", "q", "expected"), [
    ((0, 0, 0, 0), 0.5, 0.0),  # no observations
    ((4, 0, 0, 0), 0.5, 0.5),  # within (0, 1]: halfway
    ((0, 4, 0, 0), 0.5, 1.5),  # within (1, 2]
    ((2, 2, 0, 0), 0.5, 1.0),
    ((1, 1, 2, 0), 0.95, 3.8),  # rank 3.8 of 4: 0.9 of the way through (2, 4]
    ((0, 0, 0, 3), 0.5, 4.0),  # in +Inf: the largest finite bound
])
def test_quantile_interpolates_within_the_bucket(counts: tuple[int, ...], q: float,
                                                 expected: float) -> None:
    assert quantile((1.0, 2.0, 4.0), counts, q) == pytest.approx(expected)


def make_worker(worker_id: str, role: str) -> Worker:
    return Worker(worker_id, f"http://127.0.0.1:1/{worker_id}", role, "m")


def test_registry_samples_count_workers_of_alive_nodes_by_role() -> None:
    table = NodeTable(suspect_after_s=5.0, dead_after_s=10.0)
    table.register("a", b"a", make_report(workers=(make_worker("p0", "prefill"),
                                                   make_worker("d0", "decode"))), 0.0)
    table.register("b", b"b", make_report(workers=(make_worker("d1", "decode"),)), 0.0)
    table.register("c", b"c", make_report(workers=(make_worker("x0", "both"),)), 0.0)
    table.tick(6.0)  # all suspect now
    table.heartbeat("a", 1, 6.0)
    table.heartbeat("b", 1, 6.0)
    assert registry_samples(table) == [Sample("meshd_workers", 0.0, ("both",)),
                                       Sample("meshd_workers", 2.0, ("decode",)),
                                       Sample("meshd_workers", 1.0, ("prefill",))]
    names = {s.name for s in REGISTRY_SPECS}
    assert {s.name for s in registry_samples(table)} == names


def test_ledger_samples_match_the_specs() -> None:
    samples = ledger_samples(LocalLedger().stats())
    assert [s.name for s in samples] == [s.name for s in LEDGER_SPECS]
    assert all(s.value == 0 for s in samples)
