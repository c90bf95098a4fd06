"""BlockManager: allocation, ref counts, prefix cache, LRU eviction, events, invariants."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.node_agent.engine.block_manager import BlockManager, NoFreeBlocksError
from meshd.node_agent.engine.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


def make_manager(n: int = 8, bs: int = 2) -> tuple[BlockManager, list[KVEvent]]:
    events: list[KVEvent] = []
    return BlockManager(n, bs, events.append), events


def h(i: int) -> bytes:
    return i.to_bytes(32, "big")


def test_allocate_free_and_counts() -> None:
    bm, _ = make_manager()
    a = bm.allocate(3)
    assert a == [0, 1, 2] and bm.num_free_blocks == 5 and bm.usage() == pytest.approx(3 / 8)
    assert not bm.can_allocate(6)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(6)
    bm.check_integrity([a])
    bm.free(a)
    assert bm.num_free_blocks == 8
    with pytest.raises(ValueError, match="ref_cnt"):
        bm.free([0])
    bm.check_integrity([])


def test_prefix_cache_hit_and_events() -> None:
    bm, events = make_manager()
    a = bm.allocate(3)
    bm.cache_blocks(a[:2], [h(1), h(2)], None, [1, 2, 3, 4])
    assert events == [BlockStored((h(1), h(2)), None, (1, 2, 3, 4), 2)]
    assert bm.lookup([h(1), h(2), h(3)]) == a[:2]
    bm.free(a)
    # cached blocks stay findable while free, and are revived by touch
    assert bm.lookup([h(1), h(2)]) == a[:2]
    bm.touch(a[:2])
    assert bm.ref_count(a[0]) == 1 and bm.num_free_blocks == 6
    bm.check_integrity([a[:2]])


def test_uncached_blocks_reused_before_cached_and_lru_eviction() -> None:
    bm, events = make_manager(n=4)
    a = bm.allocate(4)
    bm.cache_blocks(a[:2], [h(1), h(2)], None, [0] * 4)
    bm.free(a)  # reverse order: 3, 2 (uncached -> head), then 1, 0 cached -> tail as 1, 0
    events.clear()
    assert bm.allocate(2) == [2, 3]
    assert events == []
    assert bm.allocate(1) == [1]  # the chain's tail block is evicted first
    assert events == [BlockRemoved((h(2),))]
    assert bm.lookup([h(1), h(2)]) == [0]


def test_duplicate_hash_skipped_and_run_split() -> None:
    bm, events = make_manager()
    a = bm.allocate(3)
    bm.cache_blocks(a[1:2], [h(2)], h(1), [3, 4])
    events.clear()
    b = bm.allocate(3)
    bm.cache_blocks(b, [h(1), h(2), h(3)], None, [1, 2, 3, 4, 5, 6])
    assert events == [BlockStored((h(1),), None, (1, 2), 2),
                      BlockStored((h(3),), h(2), (5, 6), 2)]
    assert bm.block_hash(b[1]) is None
    bm.check_integrity([a, b])


def test_clear_cache() -> None:
    bm, events = make_manager()
    a = bm.allocate(1)
    bm.cache_blocks(a, [h(1)], None, [1, 2])
    bm.clear_cache()
    assert events[-1] == AllBlocksCleared() and bm.lookup([h(1)]) == []
    bm.check_integrity([a])


ops = st.lists(st.tuples(st.sampled_from(["alloc", "free", "cache", "hit"]),
                         st.integers(0, 5), st.integers(0, 9)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_random_sequences_keep_invariants(seq: list[tuple[str, int, int]]) -> None:
    bm, events = make_manager(n=10, bs=1)
    tables: list[list[int]] = []
    for op, n, k in seq:
        if op == "alloc":
            if bm.can_allocate(n):
                tables.append(bm.allocate(n))
            else:
                with pytest.raises(NoFreeBlocksError):
                    bm.allocate(n)
        elif op == "free" and tables:
            bm.free(tables.pop(k % len(tables)))
        elif op == "cache" and tables:
            t = tables[k % len(tables)]
            bm.cache_blocks(t, [h(100 * k + i) for i in range(len(t))], None, list(range(len(t))))
        elif op == "hit":
            hit = bm.lookup([h(100 * k + i) for i in range(n + 1)])
            free_hits = sum(1 for b in hit if bm.ref_count(b) == 0)
            bm.touch(hit)
            tables.append(hit)
            assert bm.num_free_blocks >= 0 and free_hits >= 0
        bm.check_integrity(tables)
    stored = {x for e in events if isinstance(e, BlockStored) for x in e.block_hashes}
    removed = [x for e in events if isinstance(e, BlockRemoved) for x in e.block_hashes]
    assert set(removed) <= stored
