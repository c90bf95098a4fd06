import hashlib
from collections.abc import Sequence

import numpy as np
import pytest

from meshd.scheduler.cache_health import CacheHealthChecker, CacheHealthConfig
from meshd.scheduler.eplb import balanced_packing, rebalance_experts, replicate_experts
from meshd.scheduler.kv_events import BlockStored, KVEventBatch
from meshd.scheduler.moe import ExpertPlacement


def make_hash(seed: bytes) -> "object":
    def h(parent: int | None, tokens: Sequence[int]) -> int:
        data = seed + repr((parent, tuple(tokens))).encode()
        return int.from_bytes(hashlib.sha256(data).digest()[-8:], "big")
    return h


def make_stored(hash_fn: "object", n: int, block_size: int = 16) -> BlockStored:
    toks = list(range(n * block_size))
    hashes, parent = [], None
    for i in range(n):
        parent = hash_fn(parent, toks[i * block_size:(i + 1) * block_size])  # type: ignore[operator]
        hashes.append(parent)
    return BlockStored(tuple(hashes), None, tuple(toks), block_size)


def test_health_detects_each_issue() -> None:
    ours, theirs = make_hash(b"gw"), make_hash(b"other-seed")
    chk = CacheHealthChecker(CacheHealthConfig(block_size=16, silence_window_s=10,
                                               rehash_every=1, min_queries=100), ours)  # type: ignore[arg-type]
    chk.observe_batch("good", KVEventBatch(0, 0, (make_stored(ours, 3),)), now=0.0)
    chk.observe_batch("seed", KVEventBatch(0, 0, (make_stored(theirs, 3),)), now=0.0)
    chk.observe_batch("size", KVEventBatch(0, 0, (make_stored(ours, 1, 32),)), now=0.0)
    chk.add_worker("quiet", now=0.0)
    chk.observe_batch("drift", KVEventBatch(0, 0, ()), now=0.0)
    chk.observe_counters("drift", 0, 0)
    chk.observe_routed("drift", 1000, 900)
    chk.observe_counters("drift", 1000, 100)
    rep = chk.report(now=5.0)
    issues = {w.worker_id: w.issues for w in rep.workers}
    assert issues == {"good": (), "seed": ("hash_mismatch",), "size": ("block_size_mismatch",),
                      "quiet": (), "drift": ("hit_rate_drift",)}
    assert not rep.ok
    later = chk.report(now=11.0)
    assert all("silent" in w.issues for w in later.workers)
    assert rep.issue_counts() == {"hash_mismatch": 1, "block_size_mismatch": 1,
                                  "hit_rate_drift": 1}
    chk.check_integrity()


def test_balanced_packing_and_replication_small_cases() -> None:
    pack, rank = balanced_packing(np.array([4.0, 3.0, 2.0, 1.0]), 2)
    assert pack.tolist() == [0, 1, 1, 0] and rank.tolist() == [0, 0, 1, 1]
    phy2log, prank, cnt = replicate_experts(np.array([10.0, 1.0, 4.0]), 5)
    assert phy2log.tolist() == [0, 1, 2, 0, 0] and prank.tolist() == [0, 0, 0, 1, 2]
    assert cnt.tolist() == [3, 1, 1]


def test_rebalance_matches_deepseek_example() -> None:
    w = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                  [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    r = rebalance_experts(w, 16, 4, 2, 8)  # hierarchical: 4 groups over 2 nodes
    assert r.phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    assert r.logcnt.sum(1).tolist() == [16, 16]
    for layer in range(2):
        for e in range(12):
            slots = [s for s in r.log2phy[layer, e] if s >= 0]
            assert len(slots) == r.logcnt[layer, e]
            assert all(r.phy2log[layer, s] == e for s in slots)
    assert r.balancedness_after > r.balancedness_before
    g = rebalance_experts(w, 16, 3, 2, 8)  # 3 groups over 2 nodes: global policy
    assert g.logcnt.sum(1).tolist() == [16, 16] and g.balancedness_after > 0.75
    with pytest.raises(ValueError, match="multiple of gpus"):
        rebalance_experts(w, 15, 4, 2, 8)


def test_placement_from_phy2log() -> None:
    p = ExpertPlacement.from_phy2log([0, 1, 2, 0, 3, 1], 4, ["w0", "w0", "w1"])
    p.check_integrity()
    assert p.worker_experts() == {"w0": frozenset({0, 1, 2}), "w1": frozenset({3, 1})}
    assert p.replicas() == {0: 2, 1: 2, 2: 1, 3: 1}
