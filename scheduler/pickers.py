"""Pickers: choose one worker id from the weighted totals (non-empty)."""

from __future__ import annotations

import random
from collections.abc import Mapping

from meshd.scheduler.policy import max_score_pick
from meshd.scheduler.types import RequestView


class MaxScorePicker:
    """Highest total; ties go to the smallest worker id."""

    name = "max"
    picks_max = True

    def pick(self, request: RequestView, scores: Mapping[str, float]) -> str:
        return max_score_pick(scores)


class PowerOfTwoPicker:
    """Two distinct candidates drawn with the given RNG (in sorted-id order); the higher total
    wins, ties to the smaller id. One candidate: that one."""

    name = "p2c"

    def __init__(self, rng: random.Random | None = None, seed: int = 0) -> None:
        self._rng = rng if rng is not None else random.Random(seed)

    def pick(self, request: RequestView, scores: Mapping[str, float]) -> str:
        ids = sorted(scores)
        if len(ids) == 1:
            return ids[0]
        i, j = self._rng.sample(range(len(ids)), 2)
        a, b = ids[min(i, j)], ids[max(i, j)]
        return b if scores[b] > scores[a] else a


class RoundRobinPicker:
    """Ignores scores: the candidates in sorted-id order, one after another (baseline)."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, request: RequestView, scores: Mapping[str, float]) -> str:
        ids = sorted(scores)
        wid = ids[self._next % len(ids)]
        self._next += 1
        return wid
