"""The gateway replica's cache-routing health: `CacheHealthChecker` wired to live inputs.

`CacheHealthMonitor` owns one `meshd.scheduler.cache_health.CacheHealthChecker` and adapts the
gateway's sources to it: membership and expected block sizes (`WorkerPool.update`), KV event
batches (`KVEventFeed.on_batch`), the workers' scraped prefix-cache counters, and, per finished
choice, which worker prefilled it and what the index predicted as cached. Everything runs on
the gateway's event loop; the report is computed on demand (`/metrics`, `/debug/cache-health`).

The hash function re-hashes published blocks exactly as the gateway hashes prompts
(`block_hash`, vLLM `sha256_cbor`, the gateway's `hash_seed`). vLLM chains full digests while
events carry 64-bit ints, so the function remembers the digests it computed (bounded) and
raises LookupError for a parent it never saw; the checker then skips that event.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from meshd.coordinator.gateway.workers.load import WorkerLoad
from meshd.scheduler.block_hash import hash_block, none_hash, to_int64
from meshd.scheduler.cache_health import CacheHealthChecker, CacheHealthConfig, CacheHealthReport
from meshd.scheduler.kv_events import KVEventBatch

if TYPE_CHECKING:
    from meshd.coordinator.gateway.serving.choice import ChoiceRun

DEFAULT_CONFIG = CacheHealthConfig(silence_needs_activity=True)


class DigestMemoHash:
    """`BlockHashFn` for vLLM's chained sha256_cbor: (parent int | None, tokens) -> int.

    Remembers up to `capacity` digests it produced (oldest forgotten first) so that a chain can
    continue from a published 64-bit parent; an unknown parent raises LookupError.
    """

    __slots__ = ("_digests", "capacity", "root")

    def __init__(self, seed: str | None, capacity: int = 1 << 14) -> None:
        self.root = none_hash(seed)
        self.capacity = capacity
        self._digests: dict[int, bytes] = {}

    def __call__(self, parent: int | None, tokens: Sequence[int]) -> int:
        prev = None if parent is None else self._digests[parent]  # KeyError is a LookupError
        digest = hash_block(prev, tokens, None, self.root)
        h = to_int64(digest)
        if h not in self._digests:
            if len(self._digests) >= self.capacity:
                del self._digests[next(iter(self._digests))]
            self._digests[h] = digest
        return h


class CacheHealthMonitor:
    """Feeds the checker from the gateway's pool, event feed and finished requests."""

    def __init__(self, hash_seed: str | None, config: CacheHealthConfig = DEFAULT_CONFIG,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.checker = CacheHealthChecker(config, DigestMemoHash(hash_seed))
        self.has_events: dict[str, bool] = {}

    # -- membership (WorkerPool) ------------------------------------------------------------

    def add_worker(self, worker_id: str, block_size: int, has_events: bool) -> None:
        """Join, or a new expected block size (the one the gateway hashes the model with)."""
        self.checker.add_worker(worker_id, self.clock(), block_size)
        self.has_events[worker_id] = has_events

    def remove_worker(self, worker_id: str) -> None:
        self.checker.remove_worker(worker_id)
        self.has_events.pop(worker_id, None)

    # -- inputs -----------------------------------------------------------------------------

    def on_batch(self, worker_id: str, batch: KVEventBatch, now: float) -> None:
        """`KVEventFeed.on_batch`: `now` comes from the feed's clock, which must be ours."""
        if worker_id in self.has_events:
            self.checker.observe_batch(worker_id, batch, now)

    def observe_load(self, worker_id: str, load: WorkerLoad) -> None:
        if worker_id in self.has_events:
            self.checker.observe_counters(worker_id, int(load.prefix_queries),
                                          int(load.prefix_hits), self.clock())

    def observe_runs(self, runs: Sequence[ChoiceRun]) -> None:
        """`MeshHandler.on_runs`: per finished choice, where its prompt was first prefilled."""
        now = self.clock()
        for run in runs:
            d = run.decision
            if d is not None and run.out.finish_reason is not None and \
                    d.prefill in self.has_events:
                self.checker.observe_routed(d.prefill, run.view.num_prompt_tokens,
                                            d.cached_tokens, now)

    # -- outputs ----------------------------------------------------------------------------

    def report(self) -> CacheHealthReport:
        return self.checker.report(self.clock())

    def to_json(self, report: CacheHealthReport | None = None) -> dict[str, Any]:
        rep = report or self.report()
        cfg = self.checker.config
        return {"ok": rep.ok, "issues": rep.issue_counts(),
                "silence_window_s": cfg.silence_window_s,
                "workers": [{
                    "worker_id": w.worker_id, "issues": list(w.issues),
                    "kv_events": self.has_events.get(w.worker_id, False),
                    "batches_seen": w.batches_seen,
                    "last_event_age_s": (round(w.seconds_since_event, 3)
                                         if w.batches_seen and w.seconds_since_event is not None
                                         else None),
                    "block_size_expected": w.block_size_expected,
                    "block_size_seen": w.block_size_seen,
                    "rehash_checked": w.rehash_checked,
                    "rehash_mismatched": w.rehash_mismatched,
                    "predicted_hit_rate": w.predicted_hit_rate,
                    "reported_hit_rate": w.reported_hit_rate,
                } for w in rep.workers]}
