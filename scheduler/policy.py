"""Policy framework: a `Profile` runs filters -> weighted scorers -> picker for one request.

The framework clamps every score to [0, 1], weighs and sums them, times each plugin and counts
its failures. A plugin that raises is skipped (a filter keeps its input, a scorer contributes 0,
a picker falls back to the max-score pick) and counted; it is never fatal to the request.
Per-request state the plugins need (the prefix match) travels typed in `RequestView`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from meshd.scheduler.types import (
    Filter,
    NoWorkerAvailable,
    Picker,
    RequestView,
    Scorer,
    WorkerView,
)

T = TypeVar("T")


class Selection(NamedTuple):
    worker_id: str
    scores: Mapping[str, float]  # weighted totals of the candidates that passed the filters


class Selector(Protocol):
    """Picks one worker for a request; raises `NoWorkerAvailable` when none fits.

    `Profile` is the composable implementation; stateful baselines (round-robin, SGLang-style
    approximate tree) implement it directly so the same `Router` drives them.
    """

    name: str

    def select(self, request: RequestView, workers: Sequence[WorkerView]) -> Selection: ...


@dataclass(slots=True)
class PluginStats:
    """Per-plugin counters; mutated only by the owning `Profile`."""

    calls: int = 0
    failures: int = 0
    total_ns: int = 0
    max_ns: int = 0
    last_error: str = ""

    def record(self, ns: int) -> None:
        self.calls += 1
        self.total_ns += ns
        if ns > self.max_ns:
            self.max_ns = ns


def clamp01(v: float) -> float:
    if v > 1.0:
        return 1.0
    if v >= 0.0:
        return v
    return 0.0  # negative or NaN


def max_score_pick(scores: Mapping[str, float]) -> str:
    """Highest score; ties go to the smallest worker id (deterministic)."""
    best_id = ""
    best = -1.0
    for wid, s in scores.items():
        if s > best or (s == best and wid < best_id):
            best_id, best = wid, s
    return best_id


class Profile:
    """filters -> weighted scorers -> picker. Holds only counters as mutable state."""

    def __init__(self, name: str, filters: Sequence[Filter],
                 scorers: Sequence[tuple[Scorer, float]], picker: Picker) -> None:
        for scorer, weight in scorers:
            if not weight >= 0.0:
                raise ValueError(f"profile {name}: scorer {scorer.name} weight must be >= 0")
        self.name = name
        self.filters = tuple(filters)
        self.scorers = tuple(scorers)
        self.picker = picker
        self.stats: dict[str, PluginStats] = {}
        self._keys = ([f"filter:{f.name}" for f in self.filters],
                      [f"scorer:{s.name}" for s, _ in self.scorers], f"picker:{picker.name}")
        for key in [*self._keys[0], *self._keys[1], self._keys[2]]:
            self.stats.setdefault(key, PluginStats())

    def select(self, request: RequestView, workers: Sequence[WorkerView]) -> Selection:
        cands = self._filter(request, workers)
        if not cands:
            raise NoWorkerAvailable(f"profile {self.name}: no worker passed the filters for "
                                    f"request {request.request_id} (model {request.model})")
        total = self._score(request, cands)
        return Selection(self._pick(request, total), total)

    def _filter(self, request: RequestView, workers: Sequence[WorkerView]
                ) -> Sequence[WorkerView]:
        cands = workers
        for f, key in zip(self.filters, self._keys[0], strict=True):
            st = self.stats[key]
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
        for (scorer, weight), key in zip(self.scorers, self._keys[1], strict=True):
            st = self.stats[key]
            t0 = perf_counter_ns()
            try:
                scores = scorer.score(request, cands)
                for wid, v in scores.items():  # absent ids score 0: sparse scorers stay cheap
                    if wid in total:
                        total[wid] += weight * (v if 0.0 <= v <= 1.0 else clamp01(v))
            except Exception as e:
                st.failures += 1
                st.last_error = repr(e)
            st.record(perf_counter_ns() - t0)
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
