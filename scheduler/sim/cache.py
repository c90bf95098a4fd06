"""Per-worker prefix cache: a finite pool of KV blocks with LRU eviction of unpinned blocks.

A block is *pinned* while a request uses it (reference counted), *cached* once its prefill has
computed it (`commit`), and *evictable* when cached and unpinned. Evictable blocks sit in an LRU
`OrderedDict`; a request releases its blocks tail first (as vLLM frees them in reverse), so the
end of a chain is evicted before its shared head. Only cached blocks match a prefix.

Every change a real engine would publish becomes a KV event (`BlockStored` on commit,
`BlockRemoved` on eviction) appended to `events`; the simulator drains it into the global prefix
index, so a policy learns cache contents exactly as it does from live workers.

Blocks the request needs that no prefix can share (the partial last prompt block, generated
tokens) are counted as anonymous `scratch` blocks. Two requests admitted with the same uncached
block share one pinned copy, but each computes it (no in-flight sharing), as in vLLM.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from meshd.scheduler.kv_events import BlockRemoved, BlockStored, KVEvent


class BlockCache:
    """LRU block pool. Mutated only by its owning `SimWorker`.

    `capacity` bounds the blocks requests hold (HBM); `cache_capacity` (>= capacity, default
    equal) bounds those plus the evictable cached blocks, modelling a host-memory tier that keeps
    evicted prefixes (Mooncake/LMCache style; loading them back is treated as overlapped, free).
    """

    __slots__ = (
        "_lru",
        "_ready",
        "_ref",
        "_scratch",
        "block_size",
        "cache_capacity",
        "capacity",
        "events",
    )

    def __init__(self, capacity: int, block_size: int, cache_capacity: int = 0) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity: must be > 0 blocks, got {capacity}")
        if cache_capacity and cache_capacity < capacity:
            raise ValueError("cache_capacity: must be >= capacity")
        self.capacity = capacity
        self.cache_capacity = cache_capacity or capacity
        self.block_size = block_size
        self.events: list[KVEvent] = []
        self._ref: dict[int, int] = {}  # pinned block -> users
        self._ready: set[int] = set()  # pinned blocks already computed (cached)
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached, unpinned; oldest first
        self._scratch = 0

    # -- queries -------------------------------------------------------------------------------
    def match(self, hashes: Sequence[int]) -> int:
        """Number of leading `hashes` cached (computed) here. Does not touch LRU order."""
        n = 0
        ready, lru = self._ready, self._lru
        for h in hashes:
            if h in ready or h in lru:
                n += 1
            else:
                break
        return n

    def used(self) -> int:
        """Blocks held by requests (pinned plus scratch); the rest is free or evictable."""
        return len(self._ref) + self._scratch

    def usage(self) -> float:
        return self.used() / self.capacity

    def num_cached(self) -> int:
        return len(self._ready) + len(self._lru)

    def can_acquire(self, hashes: Sequence[int], scratch: int) -> bool:
        """Whether `acquire(hashes, scratch)` fits once evictable blocks are evicted."""
        ref = self._ref
        grow = sum(1 for h in set(hashes) if h not in ref)
        return len(ref) + grow + self._scratch + scratch <= self.capacity

    # -- verbs ---------------------------------------------------------------------------------
    def acquire(self, hashes: Sequence[int], scratch: int) -> None:
        """Pin `hashes` (allocating uncached ones) and reserve `scratch` anonymous blocks.

        Evicts LRU blocks as needed (emitting `BlockRemoved`). Raises `MemoryError` when it does
        not fit; call `can_acquire` first.
        """
        if not self.can_acquire(hashes, scratch):
            raise MemoryError("block cache full")
        ref, lru, ready = self._ref, self._lru, self._ready
        self._scratch += scratch
        for h in hashes:
            n = ref.get(h)
            if n is not None:
                ref[h] = n + 1
            elif h in lru:
                del lru[h]
                ref[h] = 1
                ready.add(h)
            else:
                ref[h] = 1
        self._evict_to_fit()

    def commit(self, hashes: Sequence[int]) -> None:
        """Mark pinned `hashes` computed; newly cached ones are published as `BlockStored`."""
        new: list[int] = []
        parent: int | None = None
        first_parent: int | None = None
        for h in hashes:
            assert h in self._ref, "commit of an unpinned block"
            if h not in self._ready:
                if not new:
                    first_parent = parent
                self._ready.add(h)
                new.append(h)
            elif new:
                self._publish(new, first_parent)
                new = []
            parent = h
        if new:
            self._publish(new, first_parent)

    def release(self, hashes: Sequence[int], scratch: int) -> None:
        """Unpin `hashes` and free `scratch` blocks; cached blocks become evictable, tail first.

        Blocks never committed (a request dropped before its prefill) are simply freed.
        """
        ref, ready, lru = self._ref, self._ready, self._lru
        self._scratch -= scratch
        assert self._scratch >= 0, "scratch released twice"
        for h in reversed(hashes):
            n = ref[h]
            if n > 1:
                ref[h] = n - 1
                continue
            del ref[h]
            if h in ready:
                ready.discard(h)
                lru[h] = None  # the tail is appended first, so it is evicted first
        self._evict_to_fit()

    def _publish(self, hashes: list[int], parent: int | None) -> None:
        self.events.append(BlockStored(tuple(hashes), parent, (), self.block_size))

    def _evict_to_fit(self) -> None:
        excess = len(self._ref) + self._scratch + len(self._lru) - self.cache_capacity
        if excess <= 0:
            return
        gone = [self._lru.popitem(last=False)[0] for _ in range(excess)]
        self.events.append(BlockRemoved(tuple(gone)))

    def check_integrity(self) -> None:
        """Raise AssertionError if the pools overlap or overflow."""
        assert self._ready <= set(self._ref), "ready block not pinned"
        assert not (set(self._ref) & set(self._lru)), "block both pinned and evictable"
        assert all(n > 0 for n in self._ref.values())
        assert self._scratch >= 0
        assert len(self._ref) + self._scratch <= self.capacity
        assert len(self._ref) + self._scratch + len(self._lru) <= self.cache_capacity
