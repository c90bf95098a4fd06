"""Policy framework: a `Profile` runs filters -> weighted scorers -> picker for one request.

The framework clamps every score to [0, 1], weighs and sums them, times each plugin and counts
its failures. A plugin that raises is skipped (a filter keeps its input, a scorer contributes 0,
a picker falls back to the max-score pick) and counted; it is never fatal to the request.
Per-request state the plugins need (the prefix match) travels typed in `RequestView`.

Hot path (see `candidates`): when every filter has a `request_key`, the filter output is reused
while the caller passes the same worker view objects; when moreover every scorer has an
`upper_bound` and the picker `picks_max`, only the request's cached workers and a shortlist of
the best-bounded others are scored, unless a skipped worker could still reach the best total.
The pick is the same as scoring every candidate.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from meshd.scheduler.candidates import CandidatePool, clamp01, same_views
from meshd.scheduler.types import (
    Filter,
    NoWorkerAvailable,
    Picker,
    RequestView,
    Scorer,
    WorkerView,
)

T = TypeVar("T")
SHORTLIST = 2  # best-bounded uncached candidates scored besides the cached ones

__all__ = ["PluginStats", "Profile", "Registry", "Selection", "Selector", "clamp01",
           "max_score_pick"]


class Selection(NamedTuple):
    worker_id: str
    # weighted totals of the candidates scored: all that passed the filters, or when the profile
    # prunes, a subset holding the pick and every candidate that could have reached its total
    scores: Mapping[str, float]
    worker: WorkerView | None = None  # the picked view, when the selector has it at hand


class Selector(Protocol):
    """Picks one worker for a request; raises `NoWorkerAvailable` when none fits.

    `Profile` is the composable implementation; stateful baselines (round-robin, SGLang-style
    approximate tree) implement it directly so the same `Router` drives them.
    """

    name: str

    def select(self, request: RequestView, workers: Sequence[WorkerView]) -> Selection: ...


@dataclass(slots=True)
class PluginStats:
    """Per-plugin counters; mutated only by the owning `Profile`. `cached`: requests whose
    filter output was reused, so the plugin was not called (not in `calls`)."""

    calls: int = 0
    failures: int = 0
    total_ns: int = 0
    max_ns: int = 0
    last_error: str = ""
    cached: int = 0

    def record(self, ns: int) -> None:
        self.calls += 1
        self.total_ns += ns
        if ns > self.max_ns:
            self.max_ns = ns


def max_score_pick(scores: Mapping[str, float]) -> str:
    """Highest score; ties go to the smallest worker id (deterministic)."""
    best_id = ""
    best = -1.0
    for wid, s in scores.items():
        if s > best or (s == best and wid < best_id):
            best_id, best = wid, s
    return best_id


class Profile:
    """filters -> weighted scorers -> picker. Mutable state: counters and candidate pools.

    `shortlist=None` scores every candidate (no pruning); tests compare both ways.
    """

    def __init__(self, name: str, filters: Sequence[Filter],
                 scorers: Sequence[tuple[Scorer, float]], picker: Picker,
                 shortlist: int | None = SHORTLIST) -> None:
        for scorer, weight in scorers:
            if not weight >= 0.0:
                raise ValueError(f"profile {name}: scorer {scorer.name} weight must be >= 0")
        if shortlist is not None and shortlist < 1:
            raise ValueError(f"profile {name}: shortlist must be >= 1 or None")
        self.name = name
        self.filters = tuple(filters)
        self.scorers = tuple(scorers)
        self.picker = picker
        self.stats: dict[str, PluginStats] = {}
        self._keys = ([f"filter:{f.name}" for f in self.filters],
                      [f"scorer:{s.name}" for s, _ in self.scorers], f"picker:{picker.name}")
        for key in [*self._keys[0], *self._keys[1], self._keys[2]]:
            self.stats.setdefault(key, PluginStats())
        self._filter_stats = [self.stats[k] for k in self._keys[0]]
        self._scoring = [(s, w, self.stats[k]) for (s, w), k in zip(self.scorers, self._keys[1],
                                                                    strict=True)]
        self._keyed = all(callable(getattr(f, "request_key", None)) for f in self.filters)
        self._key_fns: list[Callable[[RequestView], Hashable]] = [
            f.request_key for f in self.filters] if self._keyed else []  # type: ignore[attr-defined]
        self._shortlist = shortlist if (
            getattr(picker, "picks_max", False) is True
            and all(callable(getattr(s, "upper_bound", None)) for s, _ in self.scorers)) else None
        self._pool_views: Sequence[WorkerView] = ()
        self._pools: dict[Hashable, CandidatePool] = {}

    def select(self, request: RequestView, workers: Sequence[WorkerView]) -> Selection:
        pool = self._pool(request, workers)
        cands = pool.cands if pool is not None else self._filter(request, workers)
        if not cands:
            raise NoWorkerAvailable(f"profile {self.name}: no worker passed the filters for "
                                    f"request {request.request_id} (model {request.model})")
        if (pool is None or self._shortlist is None or request.num_prompt_tokens < 0
                or len(cands) <= self._shortlist):  # nothing to prune
            total = self._score(request, cands)
            wid = self._pick(request, total)
            return Selection(wid, total, pool.by_id().get(wid) if pool is not None else None)
        short = pool.shortlist(request.cached_blocks, self._shortlist, self.scorers)
        if short is None:
            total = self._score(request, cands)
        else:
            total = self._score(request, short.workers)
            if not short.skipped_bound < max(total.values()):  # a skipped one might win
                total = self._score(request, cands)
        wid = self._pick(request, total)
        return Selection(wid, total, pool.by_id().get(wid))

    def _pool(self, request: RequestView, workers: Sequence[WorkerView]) -> CandidatePool | None:
        """The reusable filter output for these views and the filters' request keys."""
        if not self._keyed:
            return None
        try:
            key = tuple([request_key(request) for request_key in self._key_fns])
            pool = self._pools.get(key) if same_views(workers, self._pool_views) else None
        except Exception:  # a broken or unhashable key: run the filters
            return None
        if pool is not None:
            pool.uses += 1
            for st in self._filter_stats:
                st.cached += 1
            return pool
        failures = sum(st.failures for st in self._filter_stats)
        pool = CandidatePool(self._filter(request, workers))
        if failures != sum(st.failures for st in self._filter_stats):
            return pool  # a filter failed: use its fallback once, never keep it
        if not same_views(workers, self._pool_views):
            self._pools.clear()
            self._pool_views = tuple(workers)
        self._pools[key] = pool
        return pool
    def _filter(self, request: RequestView, workers: Sequence[WorkerView]
                ) -> Sequence[WorkerView]:
        cands = workers
        for f, st in zip(self.filters, self._filter_stats, strict=True):
            t0 = perf_counter_ns()
            try:
                cands = f.filter(request, cands)
            except Exception as e:  # a broken plugin is skipped, never fatal
                st.failures += 1
                st.last_error = repr(e)
            st.record(perf_counter_ns() - t0)
        return cands

    def _score(self, request: RequestView, cands: Sequence[WorkerView]) -> dict[str, float]:
        total = {w.worker_id: 0.0 for w in cands}
        for scorer, weight, st in self._scoring:
            t0 = perf_counter_ns()
            try:
                scores = scorer.score(request, cands)
                for wid, v in scores.items():  # absent ids score 0: sparse scorers stay cheap
                    if wid in total:
                        total[wid] += weight * (v if 0.0 <= v <= 1.0 else clamp01(v))
            except Exception as e:
                st.failures += 1
                st.last_error = repr(e)
            ns = perf_counter_ns() - t0
            st.calls += 1
            st.total_ns += ns
            if ns > st.max_ns:
                st.max_ns = ns
        return total

    def _pick(self, request: RequestView, total: Mapping[str, float]) -> str:
        st = self.stats[self._keys[2]]
        t0 = perf_counter_ns()
        try:
            wid = self.picker.pick(request, total)
            if wid not in total:
                raise ValueError(f"picked unknown worker {wid!r}")
        except Exception as e:
            st.failures += 1
            st.last_error = repr(e)
            wid = max_score_pick(total)
        st.record(perf_counter_ns() - t0)
        return wid


class Registry(Generic[T]):
    """Name -> factory, with lazy import: a target may be `"module:attr"`, imported on first use.

    `create({"type": name, ...params})` or `create({"type": name, "parameters": {...}})`;
    an unknown name raises `ValueError` listing the valid ones.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._targets: dict[str, Callable[..., T] | str] = {}

    def register(self, name: str, target: Callable[..., T] | str) -> None:
        self._targets[name] = target

    def names(self) -> list[str]:
        return sorted(self._targets)

    def create(self, spec: str | Mapping[str, Any]) -> T:
        if isinstance(spec, str):
            spec = {"type": spec}
        name = spec.get("type")
        if not isinstance(name, str) or name not in self._targets:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}")
        params = dict(spec.get("parameters") or
                      {k: v for k, v in spec.items() if k not in ("type", "weight")})
        target = self._targets[name]
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = self._targets[name] = getattr(importlib.import_module(module), attr)
        try:
            return target(**params)
        except TypeError as e:
            raise ValueError(f"{self.kind} {name}: bad parameters {params}: {e}") from e
