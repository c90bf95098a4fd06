from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.scheduler.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
)
from meshd.scheduler.prefix_index import (
    ApplyResult,
    ApplyStatus,
    IndexSnapshot,
    PrefixIndex,
)

WORKERS = ["w0", "w1", "w2"]


def make_stored(hashes: list[int], parent: int | None = None, medium: str = "GPU") -> BlockStored:
    return BlockStored(tuple(hashes), parent, (), 16, medium)


def brute_match(ref: dict[str, set[int]], hashes: list[int]) -> dict[str, int]:
    out = {}
    for w, held in ref.items():
        n = 0
        while n < len(hashes) and hashes[n] in held:
            n += 1
        if n:
            out[w] = n
    return out


def test_match_longest_prefix_and_removal() -> None:
    idx = PrefixIndex()
    idx.apply_events("a", [make_stored([1, 2, 3])])
    idx.apply_events("b", [make_stored([1, 2])])
    assert idx.match([1, 2, 3, 4]) == {"a": 3, "b": 2}
    assert idx.parent_of("a", 3) == 2 and idx.parent_of("a", 1) is None
    idx.apply_events("a", [BlockRemoved((2,))])
    assert idx.match([1, 2, 3]) == {"a": 1, "b": 2}
    idx.remove_worker("b")
    assert idx.match([1, 2, 3]) == {"a": 1}
    idx.check_integrity()


def test_media_are_separate_unless_any() -> None:
    idx = PrefixIndex()
    idx.apply_events("a", [make_stored([1]), make_stored([2], 1, "CPU")])
    assert idx.match([1, 2]) == {"a": 1}
    assert idx.match([1, 2], medium=None) == {"a": 2}
    assert idx.match([1, 2], medium="CPU") == {}
    idx.apply_events("a", [AllBlocksCleared()])
    assert idx.num_blocks() == 0
    idx.check_integrity()


def test_other_kv_groups_ignored() -> None:
    idx = PrefixIndex(group_idx=0)
    idx.apply_events("a", [BlockStored((1,), None, (), 16, group_idx=1)])
    assert idx.match([1]) == {}


def test_gap_then_replay_is_idempotent() -> None:
    idx = PrefixIndex()
    b0 = KVEventBatch(0, 0.0, (make_stored([1]),))
    b1 = KVEventBatch(1, 0.0, (make_stored([2], 1),))
    b2 = KVEventBatch(2, 0.0, (BlockRemoved((1,)),))
    assert idx.apply_batch("a", b0) == ApplyResult(ApplyStatus.APPLIED)
    assert idx.apply_batch("a", b2) == ApplyResult(ApplyStatus.GAP, 1)
    for b in (b0, b1, b2, b1):  # replay overlaps what was applied
        idx.apply_batch("a", b)
    assert idx.expected_seq("a") == 3
    assert idx.match([2]) == {"a": 1} and idx.match([1]) == {}
    idx.resync("a", 10)
    assert idx.num_blocks("a") == 0 and idx.expected_seq("a") == 10


def test_snapshot_round_trip() -> None:
    idx = PrefixIndex()
    idx.apply_batch("a", KVEventBatch(0, 0.0, (make_stored([1, 2]), make_stored([5], None, "CPU"))))
    idx.apply_events("b", [make_stored([1])])
    snap = IndexSnapshot.from_bytes(idx.snapshot().to_bytes())
    new = PrefixIndex.restore(snap)
    new.check_integrity()
    assert new.snapshot() == idx.snapshot()
    assert new.match([1, 2]) == {"a": 2, "b": 1}
    assert new.apply_batch("a", KVEventBatch(1, 0.0, ())).status is ApplyStatus.APPLIED


op = st.one_of(
    st.tuples(st.just("store"), st.sampled_from(WORKERS), st.lists(st.integers(0, 12), max_size=5),
              st.sampled_from(["GPU", "CPU"])),
    st.tuples(st.just("remove"), st.sampled_from(WORKERS), st.lists(st.integers(0, 12), max_size=4),
              st.sampled_from(["GPU", "CPU"])),
    st.tuples(st.just("clear"), st.sampled_from(WORKERS), st.just([]), st.just("")),
    st.tuples(st.just("kill"), st.sampled_from(WORKERS), st.just([]), st.just("")),
    st.tuples(st.just("skip"), st.sampled_from(WORKERS), st.just([]), st.just("")),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(op, max_size=40), st.lists(st.integers(0, 12), max_size=6))
def test_index_matches_brute_force(ops: list[tuple[str, str, list[int], str]],
                                   query: list[int]) -> None:
    """Ops become per-worker seq-numbered batches; 'skip' loses one batch in transit, which the
    index must report as a gap; the consumer then replays the whole log from the reported seq."""
    idx = PrefixIndex()
    ref: dict[str, dict[str, set[int]]] = {}
    log: dict[str, list[KVEventBatch]] = {}
    lost: dict[str, int] = {}
    for kind, w, hashes, medium in ops:
        if kind == "kill":
            idx.remove_worker(w)
            ref.pop(w, None)
            log.pop(w, None)
            lost.pop(w, None)
            continue
        batches = log.setdefault(w, [])
        mine = ref.setdefault(w, {"GPU": set(), "CPU": set()})
        ev: KVEvent
        if kind == "store":
            ev = make_stored(hashes, None, medium)
            mine[medium].update(hashes)
        elif kind == "remove":
            ev = BlockRemoved(tuple(hashes), medium)
            mine[medium].difference_update(hashes)
        else:
            ev = AllBlocksCleared()
            if kind == "clear":
                mine["GPU"].clear()
                mine["CPU"].clear()
        batch = KVEventBatch(len(batches), 0.0, (ev,) if kind != "skip" else ())
        batches.append(batch)
        if kind == "skip" and w not in lost:
            lost[w] = batch.seq
            continue
        res = idx.apply_batch(w, batch)
        if w in lost:
            assert res == ApplyResult(ApplyStatus.GAP, lost[w])
            for b in batches[lost.pop(w):]:  # the replay
                assert idx.apply_batch(w, b).status is ApplyStatus.APPLIED
            for b in batches:  # a duplicate replay changes nothing
                assert idx.apply_batch(w, b).status is ApplyStatus.DUPLICATE
    for w in lost:  # replay the still-pending gaps
        for b in log[w][lost[w]:]:
            idx.apply_batch(w, b)
    idx.check_integrity()
    live = {w: m for w, m in ref.items() if w in idx.workers()}
    assert idx.match(query) == brute_match({w: m["GPU"] for w, m in live.items()}, query)
    assert idx.match(query, None) == brute_match(
        {w: m["GPU"] | m["CPU"] for w, m in live.items()}, query)
    assert PrefixIndex.restore(idx.snapshot()).match(query) == idx.match(query)


def test_equal_masks_share_one_object() -> None:
    idx = PrefixIndex()
    chain = [10**12 + i for i in range(64)]
    for w in [f"w{i}" for i in range(40)]:  # bits past 8 make masks that are not cached ints
        idx.apply_events(w, [make_stored(chain)])
    idx.apply_events("w39", [BlockRemoved(tuple(chain[32:]))])
    masks = idx._where["GPU"].values()
    assert len({id(m) for m in masks}) == len(set(masks)) == 2
    assert idx.match(chain) == {**{f"w{i}": 64 for i in range(39)}, "w39": 32}
    assert idx.match([]) == {} and PrefixIndex().match(chain) == {}
    idx.check_integrity()
