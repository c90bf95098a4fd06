"""BlockCache: LRU order, pinning, KV events, capacity."""

from __future__ import annotations

import pytest

from meshd.scheduler.kv_events import BlockRemoved, BlockStored
from meshd.scheduler.sim.cache import BlockCache


def make_cache(capacity: int = 4, cache_capacity: int = 0) -> BlockCache:
    return BlockCache(capacity, 16, cache_capacity)


def test_commit_publishes_stored_with_parent() -> None:
    c = make_cache()
    c.acquire((1, 2), scratch=1)
    assert c.match((1, 2)) == 0  # pinned but not computed yet
    c.commit((1, 2))
    assert c.events == [BlockStored((1, 2), None, (), 16)]
    assert c.match((1, 2, 3)) == 2
    assert c.used() == 3
    c.check_integrity()


def test_commit_after_shared_head_names_parent() -> None:
    c = make_cache()
    c.acquire((1,), 0)
    c.commit((1,))
    c.acquire((1, 5), 0)
    c.commit((1, 5))
    assert c.events[-1] == BlockStored((5,), 1, (), 16)


def test_release_keeps_blocks_cached_and_evicts_tail_first() -> None:
    c = make_cache(capacity=4)
    c.acquire((1, 2, 3), 0)
    c.commit((1, 2, 3))
    c.release((1, 2, 3), 0)
    assert c.used() == 0 and c.num_cached() == 3 and c.match((1, 2, 3)) == 3
    c.events.clear()
    c.acquire((7, 8), 0)  # needs one eviction: the tail (3) goes first
    assert c.events == [BlockRemoved((3,))]
    assert c.match((1, 2, 3)) == 2
    c.check_integrity()


def test_lru_order_across_requests() -> None:
    c = make_cache(capacity=2)
    for h in (10, 20):
        c.acquire((h,), 0)
        c.commit((h,))
        c.release((h,), 0)
    c.acquire((10,), 0)  # touch 10: now 20 is least recent
    c.release((10,), 0)
    c.acquire((30,), 0)
    assert c.match((10,)) == 1 and c.match((20,)) == 0


def test_pinned_blocks_are_never_evicted() -> None:
    c = make_cache(capacity=3)
    c.acquire((1, 2), 0)
    c.commit((1, 2))
    assert c.can_acquire((3,), 0)
    assert not c.can_acquire((3, 4), 0)
    with pytest.raises(MemoryError):
        c.acquire((3, 4), 0)
    c.check_integrity()


def test_shared_block_is_reference_counted() -> None:
    c = make_cache()
    c.acquire((1,), 0)
    c.acquire((1,), 0)
    c.commit((1,))
    c.release((1,), 0)
    assert c.used() == 1
    c.release((1,), 0)
    assert c.used() == 0 and c.match((1,)) == 1


def test_host_tier_keeps_more_evictable_blocks() -> None:
    c = make_cache(capacity=2, cache_capacity=5)
    for h in (1, 2, 3, 4, 5):
        c.acquire((h,), 0)
        c.commit((h,))
        c.release((h,), 0)
    assert c.num_cached() == 5 and c.used() == 0
    assert not c.can_acquire((6, 7, 8), 0)  # HBM bound applies to pinned blocks
    c.acquire((6, 7), 0)
    assert c.match((1,)) == 0 and c.match((2,)) == 0 and c.match((3,)) == 1
    c.check_integrity()


def test_uncommitted_blocks_are_freed_silently() -> None:
    c = make_cache()
    c.acquire((1,), 2)
    c.release((1,), 2)
    assert c.used() == 0 and c.num_cached() == 0 and c.events == []
