"""Baseline selectors for comparison (same `Selector` contract, so the same Router drives them).

`ApproxTreeSelector` follows SGLang's cache-aware balancer: the router remembers which prefixes
it sent where (no KV events: an approximation of the workers' caches), routes to the longest
remembered match when the match rate is high enough, to the worker with the least remembered
state otherwise, and falls back to shortest-queue when load is imbalanced. Our keys are the
request's chained block hashes (a hash names its whole prefix, so the radix tree over them
collapses to a map hash -> {worker: last use}); SGLang walks characters, a finer grain.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from meshd.scheduler.policy import Selection
from meshd.scheduler.types import NoWorkerAvailable, RequestView, WorkerView


def _load(w: WorkerView) -> int:
    return w.num_running + w.num_waiting


class ApproxTreeSelector:
    name = "approx_tree"

    def __init__(self, cache_threshold: float = 0.5, balance_abs_threshold: int = 32,
                 balance_rel_threshold: float = 1.1, max_entries: int = 1 << 20,
                 clock: Callable[[], float] | None = None) -> None:
        self.cache_threshold = cache_threshold
        self.balance_abs = balance_abs_threshold
        self.balance_rel = balance_rel_threshold
        self.max_entries = max_entries
        self._tick = 0.0
        self._clock = clock
        self._tree: OrderedDict[int, dict[str, float]] = OrderedDict()  # LRU order
        self._size: dict[str, int] = {}

    def _now(self) -> float:
        if self._clock is not None:
            return self._clock()
        self._tick += 1.0
        return self._tick

    def select(self, request: RequestView, workers: Sequence[WorkerView]) -> Selection:
        cands = [w for w in workers if w.healthy and w.model == request.model
                 and w.role.can_decode()]
        if not cands:
            raise NoWorkerAvailable(f"approx_tree: no worker for model {request.model}")
        loads = {w.worker_id: _load(w) for w in cands}
        hi, lo = max(loads.values()), min(loads.values())
        if hi - lo > self.balance_abs and hi > lo * self.balance_rel:
            wid = min(loads, key=lambda k: (loads[k], k))
        else:
            matched = self._match(request.block_hashes, loads)
            n = len(request.block_hashes)
            best = max(matched.values(), default=0)
            if n and best / n > self.cache_threshold:
                wid = min((k for k, v in matched.items() if v == best),
                          key=lambda k: (loads[k], k))
            else:
                wid = min(loads, key=lambda k: (self._size.get(k, 0), loads[k], k))
        self._insert(request.block_hashes, wid)
        return Selection(wid, {k: float(loads[k] == loads[wid]) for k in loads})

    def _match(self, hashes: Sequence[int], loads: dict[str, int]) -> dict[str, int]:
        out: dict[str, int] = {}
        alive = set(loads)
        for i, h in enumerate(hashes):
            holders = self._tree.get(h)
            alive = alive & holders.keys() if holders else set()
            for k in alive:
                out[k] = i + 1
            if not alive:
                break
        return out

    def _insert(self, hashes: Sequence[int], wid: str) -> None:
        now = self._now()
        for h in hashes:
            holders = self._tree.get(h)
            if holders is None:
                holders = self._tree[h] = {}
            else:
                self._tree.move_to_end(h)
            if wid not in holders:
                self._size[wid] = self._size.get(wid, 0) + 1
            holders[wid] = now
        while len(self._tree) > self.max_entries:
            _, evicted = self._tree.popitem(last=False)
            for k in evicted:
                self._size[k] -= 1

    def check_integrity(self) -> None:
        sizes: dict[str, int] = {}
        for holders in self._tree.values():
            for k in holders:
                sizes[k] = sizes.get(k, 0) + 1
        assert sizes == {k: v for k, v in self._size.items() if v}, "size counters drifted"
