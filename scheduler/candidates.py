"""Candidate pools: a profile's filter output kept across requests, and exact pruning.

A `CandidatePool` holds the candidates that passed a profile's filters for one set of worker
views (compared by identity: views are immutable, a changed worker comes as a new view) and one
tuple of filter request keys. From its second use on it also holds every candidate's bound
total, the weighted sum of its scorers' `upper_bound`s, accumulated exactly as the profile
accumulates scores, sorted best first. `shortlist` then names the candidates worth scoring for a
request: every candidate the request caches blocks on, plus the `k` best-bounded others. Float
rounding is monotone, so a skipped candidate's total is at most its bound; when the best
skipped bound is below the best scored total, the skipped candidates cannot win (nor tie).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from operator import is_
from typing import NamedTuple

from meshd.scheduler.types import Scorer, WorkerView

NO_BOUND = float("-inf")  # best skipped bound when nothing was skipped


class Shortlist(NamedTuple):
    workers: list[WorkerView]  # to score: the cached candidates, then the best-bounded others
    skipped_bound: float  # highest bound total among the candidates left out (NO_BOUND if none)


def same_views(a: Sequence[WorkerView], b: Sequence[WorkerView]) -> bool:
    """Same view objects in the same order (cheap: identity, not field equality)."""
    return len(a) == len(b) and all(map(is_, a, b))


def clamp01(v: float) -> float:
    if v > 1.0:
        return 1.0
    if v >= 0.0:
        return v
    return 0.0  # negative or NaN


def bound_total(worker: WorkerView, scorers: Sequence[tuple[Scorer, float]]) -> float:
    """Upper bound on the worker's weighted total when the request caches nothing on it.
    Raises `AttributeError` for a scorer without `upper_bound`."""
    t = 0.0
    for scorer, weight in scorers:
        t += weight * clamp01(scorer.upper_bound(worker))  # type: ignore[attr-defined]
    if t != t:
        raise ValueError(f"bound total of {worker.worker_id} is NaN (infinite weight?)")
    return t


class CandidatePool:
    """Filter output for one worker set and filter key; mutated only by the owning profile."""

    __slots__ = ("_by_id", "_order", "_unbounded", "cands", "uses")

    def __init__(self, cands: Sequence[WorkerView]) -> None:
        self.cands = cands
        self.uses = 0  # requests served from this pool after the one that built it
        self._by_id: dict[str, WorkerView] | None = None
        self._order: list[tuple[float, str, WorkerView]] | None = None
        self._unbounded = False  # a bound failed: always score in full

    def by_id(self) -> dict[str, WorkerView]:
        if self._by_id is None:
            self._by_id = {w.worker_id: w for w in self.cands}
        return self._by_id

    def shortlist(self, cached: Mapping[str, int], k: int,
                  scorers: Sequence[tuple[Scorer, float]]) -> Shortlist | None:
        """The candidates to score (see the module doc); None while the pool is new (a caller
        passing fresh views every time never pays for the bounds) or a bound failed."""
        if self._order is None:
            if self.uses < 1 or self._unbounded:
                return None
            try:
                order = [(bound_total(w, scorers), w.worker_id, w) for w in self.cands]
            except Exception:  # a broken bound: this pool is scored in full
                self._unbounded = True
                return None
            order.sort(key=lambda e: (-e[0], e[1]))
            self._order = order
        by_id = self.by_id()
        take = [by_id[wid] for wid in cached if wid in by_id]
        room = k
        for bound, wid, w in self._order:
            if wid in cached:
                continue
            if not room:
                return Shortlist(take, bound)
            take.append(w)
            room -= 1
        return Shortlist(take, NO_BOUND)
