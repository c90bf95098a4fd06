"""Cache-routing health: is the prefix index telling the truth about the workers?

Prefix-aware routing silently degrades to random routing when the gateway and the workers
disagree on block size or hash seed (`PYTHONHASHSEED`, `--prefix-caching-hash-algo`), when a
worker stops publishing events, or when events are lost. `CacheHealthChecker` watches the event
stream and the workers' prefix-cache counters and returns a typed `CacheHealthReport` that
`meshd status` prints and a metric exports. Plain data: clocks and the hash function are passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meshd.scheduler.kv_events import BlockStored, KVEventBatch

# (parent block hash or None, the block's token ids) -> block hash as an unsigned 64-bit int;
# the gateway's own function (see block_hash), the same one used for RequestView.block_hashes.
# vLLM chains full digests, so a published 64-bit parent can only be expanded if the function
# has seen it: it raises LookupError for an unknown parent and that event is not checked.
BlockHashFn = Callable[[int | None, Sequence[int]], int]


@dataclass(frozen=True, slots=True)
class CacheHealthConfig:
    block_size: int = 16
    silence_window_s: float = 30.0  # no event batch for this long: the worker is "silent"
    rehash_every: int = 16  # re-hash one BlockStored in N (cost control); 1 checks all
    max_drift: float = 0.2  # |predicted - reported| hit-rate difference that counts as drift
    min_queries: int = 1000  # prompt tokens queried before a hit-rate drift is judged
    # True: "silent" only when the worker did prefill work (routed requests, queries in its
    # counters) and no event followed within the window; an idle worker publishes nothing.
    silence_needs_activity: bool = False

    def __post_init__(self) -> None:
        for name in ("block_size", "rehash_every", "min_queries"):
            if getattr(self, name) <= 0:
                raise ValueError(f"cache_health.{name}: must be > 0")
        if not 0.0 < self.max_drift <= 1.0:
            raise ValueError("cache_health.max_drift: must be in (0, 1]")


@dataclass(frozen=True, slots=True)
class WorkerCacheHealth:
    worker_id: str
    issues: tuple[str, ...]  # empty: healthy. Stable codes: block_size_mismatch, hash_mismatch,
    # silent, hit_rate_drift
    seconds_since_event: float | None
    block_size_seen: int | None
    rehash_checked: int
    rehash_mismatched: int
    predicted_hit_rate: float | None  # what the index promised for requests routed there
    reported_hit_rate: float | None  # vLLM prefix_cache_hits / prefix_cache_queries (deltas)
    batches_seen: int = 0
    block_size_expected: int | None = None


@dataclass(frozen=True, slots=True)
class CacheHealthReport:
    now: float
    workers: tuple[WorkerCacheHealth, ...]

    @property
    def ok(self) -> bool:
        return all(not w.issues for w in self.workers)

    def issue_counts(self) -> dict[str, int]:
        """Issue code -> number of workers with it (the metric's labels)."""
        out: dict[str, int] = {}
        for w in self.workers:
            for code in w.issues:
                out[code] = out.get(code, 0) + 1
        return out


@dataclass(slots=True)
class _WorkerState:
    last_event: float | None = None
    block_size: int | None = None  # expected for this worker (None: config.block_size)
    batches_seen: int = 0
    next_check: int = 0  # stored_seen value at which the next re-hash is due
    active_since: float | None = None  # first prefill work not yet followed by an event
    block_size_seen: int | None = None
    stored_seen: int = 0
    rehash_checked: int = 0
    rehash_mismatched: int = 0
    predicted_hits: int = 0
    predicted_queries: int = 0
    counters_base: tuple[int, int] | None = None  # (queries, hits) at first observation
    counters_last: tuple[int, int] = (0, 0)


class CacheHealthChecker:
    """Fed by the event consumer and the metrics scraper; `report(now)` is side-effect free."""

    def __init__(self, config: CacheHealthConfig, hash_fn: BlockHashFn) -> None:
        self.config = config
        self._hash = hash_fn
        self._workers: dict[str, _WorkerState] = {}

    def add_worker(self, worker_id: str, now: float, block_size: int | None = None) -> None:
        """Start the silence window for a worker even before its first event. `block_size`:
        what the gateway hashes this worker's prompts with (None: config.block_size); calling
        again for a known worker only updates it."""
        st = self._workers.get(worker_id)
        if st is None:
            st = self._workers[worker_id] = _WorkerState(last_event=now)
        st.block_size = block_size

    def remove_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    def observe_batch(self, worker_id: str, batch: KVEventBatch, now: float) -> None:
        st = self._workers.setdefault(worker_id, _WorkerState())
        st.last_event = now
        st.batches_seen += 1
        st.active_since = None
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                self._observe_stored(st, ev)

    def _observe_stored(self, st: _WorkerState, ev: BlockStored) -> None:
        st.block_size_seen = ev.block_size
        st.stored_seen += 1
        if ev.block_size != (st.block_size or self.config.block_size) or ev.lora_id is not None:
            return  # a size mismatch is reported on its own; LoRA blocks hash extra keys
        if st.stored_seen <= st.next_check:
            return
        tokens = ev.token_ids
        bs = ev.block_size
        if len(tokens) < bs * len(ev.block_hashes):
            return  # no tokens carried (older vLLM): cannot check
        parent = ev.parent_block_hash
        mismatch = False
        try:
            for i, published in enumerate(ev.block_hashes):
                ours = self._hash(parent, tokens[i * bs:(i + 1) * bs])
                if ours != published:
                    mismatch = True
                    break
                parent = ours
        except LookupError:
            return  # parent unknown to the hash function: the next event is still due
        st.next_check = st.stored_seen + self.config.rehash_every - 1
        st.rehash_checked += 1
        st.rehash_mismatched += mismatch

    def observe_routed(self, worker_id: str, prompt_tokens: int, predicted_cached: int,
                       now: float | None = None) -> None:
        """A request was prefilled on `worker_id` expecting `predicted_cached` cached tokens.
        With `now`, at least a block's worth of uncached tokens counts as activity."""
        st = self._workers.setdefault(worker_id, _WorkerState())
        st.predicted_queries += prompt_tokens
        st.predicted_hits += min(predicted_cached, prompt_tokens)
        self._active(st, prompt_tokens - predicted_cached, now)

    def observe_counters(self, worker_id: str, queries: int, hits: int,
                         now: float | None = None) -> None:
        """Cumulative vLLM `prefix_cache_queries` / `prefix_cache_hits` (tokens) from /metrics.
        With `now`, a block's worth of new misses counts as activity."""
        st = self._workers.setdefault(worker_id, _WorkerState())
        if st.counters_base is None or queries < st.counters_last[0]:
            st.counters_base = (queries, hits)  # first sample or a counter reset (restart)
            st.predicted_hits = st.predicted_queries = 0
        else:
            last_q, last_h = st.counters_last
            self._active(st, (queries - last_q) - (hits - last_h), now)
        st.counters_last = (queries, hits)

    def _active(self, st: _WorkerState, uncached_tokens: int, now: float | None) -> None:
        if now is not None and st.active_since is None and \
                uncached_tokens >= (st.block_size or self.config.block_size):
            st.active_since = now

    def report(self, now: float) -> CacheHealthReport:
        return CacheHealthReport(now, tuple(self._judge(w, st, now)
                                            for w, st in sorted(self._workers.items())))

    def _judge(self, worker_id: str, st: _WorkerState, now: float) -> WorkerCacheHealth:
        cfg = self.config
        issues: list[str] = []
        expected = st.block_size or cfg.block_size
        if st.block_size_seen is not None and st.block_size_seen != expected:
            issues.append("block_size_mismatch")
        if st.rehash_mismatched:
            issues.append("hash_mismatch")
        age = None if st.last_event is None else now - st.last_event
        if cfg.silence_needs_activity:
            silent = st.active_since is not None and now - st.active_since > cfg.silence_window_s
        else:
            silent = age is None or age > cfg.silence_window_s
        if silent:
            issues.append("silent")
        predicted = reported = None
        if st.predicted_queries >= cfg.min_queries:
            predicted = st.predicted_hits / st.predicted_queries
        if st.counters_base is not None:
            dq = st.counters_last[0] - st.counters_base[0]
            if dq >= cfg.min_queries:
                reported = (st.counters_last[1] - st.counters_base[1]) / dq
        if predicted is not None and reported is not None and \
                abs(predicted - reported) > cfg.max_drift:
            issues.append("hit_rate_drift")
        return WorkerCacheHealth(worker_id, tuple(issues), age, st.block_size_seen,
                                 st.rehash_checked, st.rehash_mismatched, predicted, reported,
                                 st.batches_seen, expected)

    def check_integrity(self) -> None:
        for w, st in self._workers.items():
            assert st.rehash_mismatched <= st.rehash_checked <= st.stored_seen, w
            assert 0 <= st.predicted_hits <= st.predicted_queries, w
