"""The fewest role changes from the running split to a planned one."""

from __future__ import annotations

import pytest

from meshd.scheduler.role_moves import role_moves

W = [("p0", "prefill"), ("p1", "prefill"), ("d2", "decode"), ("d3", "decode")]


@pytest.mark.parametrize(("target", "moves"), [
    ((2, 2, 0), []),                                   # already there
    ((3, 1, 0), [("d3", "prefill")]),                  # one decode worker becomes prefill
    ((1, 3, 0), [("p1", "decode")]),
    ((0, 0, 4), [("p0", "both"), ("p1", "both"), ("d2", "both"), ("d3", "both")]),
    ((1, 1, 2), [("p1", "both"), ("d3", "both")]),     # each role keeps its first workers
])
def test_the_fewest_moves_reach_the_target(target: tuple[int, int, int],
                                           moves: list[tuple[str, str]]) -> None:
    got = role_moves(W, target)
    assert got == moves
    after = dict(W) | dict(got)
    assert [sum(1 for r in after.values() if r == k) for k in ("prefill", "decode", "both")
            ] == list(target)


@pytest.mark.parametrize("target", [(1, 1, 1), (5, 0, 0), (-1, 3, 2)])
def test_a_target_that_does_not_count_the_workers_is_refused(
        target: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match="sum to 4"):
        role_moves(W, target)
