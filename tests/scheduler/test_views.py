"""The one `WorkerView` builder: every field comes from exactly one typed part."""

from __future__ import annotations

import dataclasses

import pytest

from meshd.scheduler.moe import ExpertPlacement
from meshd.scheduler.types import Role, WorkerView
from meshd.scheduler.views import LoadSample, WorkerFacts, build_view, hosted_experts


def test_every_view_field_comes_from_exactly_one_part() -> None:
    view = {f.name for f in dataclasses.fields(WorkerView)}
    facts = {f.name for f in dataclasses.fields(WorkerFacts)}
    load = set(LoadSample._fields)
    assert not facts & load, facts & load
    assert facts | load == view, f"not built: {view - facts - load}, unknown: {facts | load - view}"


def test_build_view_copies_each_field_by_name() -> None:
    facts = WorkerFacts("w1", Role.DECODE, "m", node_id="n1", block_size=32,
                        kv_capacity_blocks=900, experts=frozenset({1, 2}),
                        attributes={"zone": "a"}, cost={"decode_base_ms": 3.0})
    load = LoadSample(num_running=4, num_waiting=2, num_waiting_tokens=777, kv_usage=0.25,
                      healthy=False)
    view = build_view(facts, load)
    for f in dataclasses.fields(WorkerView):
        src = facts if f.name in WorkerFacts.__dataclass_fields__ else load
        assert getattr(view, f.name) == getattr(src, f.name), f.name
    assert view.attributes is facts.attributes and view.cost is facts.cost  # shared, not copied


def test_idle_view_equals_the_dataclass_defaults() -> None:
    assert build_view(WorkerFacts("w", Role.BOTH, "m")) == WorkerView("w", Role.BOTH, "m")


@pytest.mark.parametrize(("layers", "want"), [
    ([], frozenset()),
    ([[0, 1, 2, 3]], frozenset({0, 1, 2, 3})),
    ([[0, 1, 2], [1, 2, 3]], frozenset({1, 2})),  # every layer
    ([[0, 1], [2, 3]], frozenset({0, 1, 2, 3})),  # none in every layer: any (never "all")
])
def test_hosted_experts_folds_layers(layers: list[list[int]], want: frozenset[int]) -> None:
    assert hosted_experts(layers) == want


def test_placement_from_worker_sets() -> None:
    p = ExpertPlacement.from_worker_sets(8, {"p": range(8), "a": [0, 1, 2, 3], "b": [4, 5, 6, 7]},
                                         num_layers=3)
    p.check_integrity()
    assert p.worker_experts() == {"p": frozenset(range(8)), "a": frozenset({0, 1, 2, 3}),
                                  "b": frozenset({4, 5, 6, 7})}
    assert p.replicas(2) == {e: 2 for e in range(8)}
    with pytest.raises(ValueError, match=r"experts \[7\] are hosted by no worker"):
        ExpertPlacement.from_worker_sets(8, {"a": range(4), "b": [4, 5, 6]})
    with pytest.raises(ValueError, match=r"worker b: experts \[9\] outside 0..7"):
        ExpertPlacement.from_worker_sets(8, {"a": range(8), "b": [9]})
