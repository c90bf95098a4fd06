"""Global prefix index: which worker caches which KV blocks, fed by the workers' KV events.

Layout (plain data, no I/O):
- every live worker owns one bit; `_where[medium][hash]` is the bitmask of workers holding the
  block on that medium, so `match` walks the request's chain once, AND-ing a candidate mask, in
  time proportional to the matched prefix, not to the number of workers. Equal masks share one
  int object (`_masks`), so a walk touches a few hot mask objects instead of one per block;
- `_blocks[worker][medium][hash] = parent hash` is the per-worker truth, used for removal,
  clears, worker death, snapshots and integrity checks;
- `_next_seq[worker]` is the next event-batch sequence number expected from that worker's
  publisher. A batch ahead of it is not applied and the caller is told to replay from
  `_next_seq`; a batch behind it is a duplicate (replays overlap the live stream) and skipped, so
  replays are idempotent.

Block hashes are chained (a hash names its whole prefix), so a set lookup per block is a correct
longest-prefix match. Only events of KV cache group `group_idx` are indexed (hybrid models publish
one group per attention type; the full-attention group is the one a prefix match means).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from itertools import groupby, repeat
from operator import or_
from typing import NamedTuple

import msgpack

from meshd.scheduler.kv_events import (
    MEDIUM_GPU,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
)

_MISSING = object()
_MAX_SHARED_MASKS = 1 << 16  # distinct masks kept for sharing; past it the table restarts


class ApplyStatus(enum.Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"  # seq already applied (replay overlap): skipped
    GAP = "gap"  # seq ahead of the expected one: not applied, replay needed


class ApplyResult(NamedTuple):
    status: ApplyStatus
    replay_from: int | None = None  # set when status is GAP


@dataclass(frozen=True, slots=True)
class IndexSnapshot:
    """Plain-data copy of the index: per worker, the next expected seq and its blocks."""

    group_idx: int | None
    next_seq: Mapping[str, int]
    blocks: Mapping[str, Mapping[str, Sequence[tuple[int, int | None]]]]

    def to_bytes(self) -> bytes:
        body = {"group_idx": self.group_idx, "next_seq": dict(self.next_seq),
                "blocks": {w: {m: [list(b) for b in bl] for m, bl in meds.items()}
                           for w, meds in self.blocks.items()}}
        return msgpack.packb(body, use_bin_type=True)

    @staticmethod
    def from_bytes(data: bytes) -> IndexSnapshot:
        body = msgpack.unpackb(data, raw=False, strict_map_key=False)
        blocks = {w: {m: [(h, p) for h, p in bl] for m, bl in meds.items()}
                  for w, meds in body["blocks"].items()}
        return IndexSnapshot(body["group_idx"], body["next_seq"], blocks)


class PrefixIndex:
    """Which worker holds which block, per medium. Not thread-safe: one owner applies and reads."""

    def __init__(self, group_idx: int | None = 0) -> None:
        self.group_idx = group_idx
        self._bit: dict[str, int] = {}
        self._names: dict[int, str] = {}  # bit position -> worker id
        self._live_mask = 0
        self._next_seq: dict[str, int] = {}
        self._where: dict[str, dict[int, int]] = {MEDIUM_GPU: {}}
        self._masks: dict[int, int] = {}  # mask -> its shared int object (sharing only)
        self._blocks: dict[str, dict[str, dict[int, int | None]]] = {}

    # -- workers -------------------------------------------------------------------------------
    def add_worker(self, worker_id: str, next_seq: int = 0) -> None:
        """Start tracking a worker; its first batch is expected to carry `next_seq`."""
        if worker_id in self._bit:
            return
        pos = 0
        while pos in self._names:
            pos += 1
        self._bit[worker_id] = 1 << pos
        self._names[pos] = worker_id
        self._live_mask |= 1 << pos
        self._next_seq[worker_id] = next_seq
        self._blocks[worker_id] = {}

    def remove_worker(self, worker_id: str) -> None:
        """Forget a dead or restarted worker and every block it held."""
        if worker_id not in self._bit:
            return
        self._clear(worker_id, None)
        bit = self._bit.pop(worker_id)
        del self._names[bit.bit_length() - 1]
        self._live_mask &= ~bit
        del self._next_seq[worker_id]
        del self._blocks[worker_id]

    def resync(self, worker_id: str, next_seq: int) -> None:
        """Accept lost history (replay no longer available): drop the worker's blocks and
        continue from `next_seq`. The index under-reports that worker until it stores again."""
        self.add_worker(worker_id)
        self._clear(worker_id, None)
        self._next_seq[worker_id] = next_seq

    def workers(self) -> list[str]:
        return list(self._bit)

    def expected_seq(self, worker_id: str) -> int | None:
        return self._next_seq.get(worker_id)

    # -- events --------------------------------------------------------------------------------
    def apply_batch(self, worker_id: str, batch: KVEventBatch) -> ApplyResult:
        """Apply one decoded batch in sequence order; unknown workers are added expecting 0."""
        if worker_id not in self._bit:
            self.add_worker(worker_id)
        expected = self._next_seq[worker_id]
        if batch.seq < expected:
            return ApplyResult(ApplyStatus.DUPLICATE)
        if batch.seq > expected:
            return ApplyResult(ApplyStatus.GAP, expected)
        self.apply_events(worker_id, batch.events)
        self._next_seq[worker_id] = expected + 1
        return ApplyResult(ApplyStatus.APPLIED)

    def apply_events(self, worker_id: str, events: Iterable[KVEvent]) -> None:
        """Apply events without sequence checks (the caller orders them)."""
        if worker_id not in self._bit:
            self.add_worker(worker_id)
        bit = self._bit[worker_id]
        mine = self._blocks[worker_id]
        group = self.group_idx
        for ev in events:
            if isinstance(ev, BlockStored):
                if group is None or ev.group_idx is None or ev.group_idx == group:
                    self._store(bit, mine, ev)
            elif isinstance(ev, BlockRemoved):
                if group is None or ev.group_idx is None or ev.group_idx == group:
                    self._remove(bit, mine, ev.medium, ev.block_hashes)
            elif isinstance(ev, AllBlocksCleared):
                self._clear(worker_id, ev.medium)

    def _where_for(self, medium: str) -> dict[int, int]:
        where = self._where.get(medium)
        if where is None:
            where = self._where[medium] = {}
        return where

    def _store(self, bit: int, mine: dict[str, dict[int, int | None]], ev: BlockStored) -> None:
        hashes = ev.block_hashes
        if not hashes:
            return
        blocks = mine.get(ev.medium)
        if blocks is None:
            blocks = mine[ev.medium] = {}
        blocks[hashes[0]] = ev.parent_block_hash
        if len(hashes) > 1:
            blocks.update(zip(hashes[1:], hashes, strict=False))
        where = self._where_for(ev.medium)
        get = where.get
        shared = self._shared_masks().setdefault
        old_m, new_m = -1, 0
        for h in hashes:
            m = get(h, 0)
            if m != old_m:  # a chain's blocks mostly share one mask: one lookup per run
                old_m, new_m = m, m | bit
                new_m = shared(new_m, new_m)
            where[h] = new_m

    def _shared_masks(self) -> dict[int, int]:
        if len(self._masks) > _MAX_SHARED_MASKS:
            self._masks.clear()
        return self._masks

    def _remove(self, bit: int, mine: dict[str, dict[int, int | None]], medium: str,
                hashes: Iterable[int]) -> None:
        blocks = mine.get(medium)
        if not blocks:
            return
        where = self._where[medium]
        keep = ~bit
        pop = blocks.pop
        shared = self._shared_masks().setdefault
        old_m, new_m = -1, 0
        for h in hashes:
            if pop(h, _MISSING) is not _MISSING:
                m = where[h]
                if m != old_m:
                    old_m, new_m = m, m & keep
                    new_m = shared(new_m, new_m)
                if new_m:
                    where[h] = new_m
                else:
                    del where[h]

    def _clear(self, worker_id: str, medium: str | None) -> None:
        mine = self._blocks[worker_id]
        bit = self._bit[worker_id]
        for med in [medium] if medium is not None else list(mine):
            blocks = mine.get(med)
            if blocks:
                self._remove(bit, mine, med, list(blocks))

    # -- queries -------------------------------------------------------------------------------
    def match(self, block_hashes: Sequence[int], medium: str | None = MEDIUM_GPU
              ) -> dict[str, int]:
        """Longest cached prefix per worker, in blocks: {worker_id: n} for workers with n > 0.

        `medium=None` counts a block held on any medium. Cost: one dict lookup per matched
        block plus one entry per returned worker, independent of the number of workers.
        """
        if medium is None:
            return self._match_any(block_hashes)
        where = self._where.get(medium)
        if where is None or not block_hashes:
            return {}
        return self._walk(map(where.get, block_hashes, repeat(0)))

    def _match_any(self, block_hashes: Sequence[int]) -> dict[str, int]:
        wheres = list(self._where.values())
        if len(wheres) == 1:
            return self.match(block_hashes, next(iter(self._where)))
        if not block_hashes:
            return {}
        masks = (reduce(or_, [w.get(h, 0) for w in wheres]) for h in block_hashes)
        return self._walk(masks)

    def _walk(self, masks: Iterable[int]) -> dict[str, int]:
        """AND the per-block masks (at least one) until no worker is left; record where each
        worker drops out. A run of equal masks (a chain cached by the same workers: shared
        objects) changes nothing after its first block, so runs are counted in C by `groupby`;
        it pulls one mask past the run, which the walk needs anyway."""
        result: dict[str, int] = {}
        names = self._names
        cand = self._live_mask
        if not cand:
            return result
        i = 0
        for m, run in groupby(masks):
            m &= cand
            if m != cand:  # someone dropped out at block i
                lost = cand ^ m
                while i and lost:
                    low = lost & -lost
                    result[names[low.bit_length() - 1]] = i
                    lost ^= low
                if not m:
                    return result
                cand = m
            i += len(list(run))
        while cand:
            low = cand & -cand
            result[names[low.bit_length() - 1]] = i
            cand ^= low
        return result

    def num_blocks(self, worker_id: str | None = None, medium: str | None = None) -> int:
        ids = [worker_id] if worker_id is not None else list(self._blocks)
        return sum(len(b) for w in ids for m, b in self._blocks.get(w, {}).items()
                   if medium is None or m == medium)

    def holds(self, worker_id: str, block_hash: int, medium: str = MEDIUM_GPU) -> bool:
        return block_hash in self._blocks.get(worker_id, {}).get(medium, {})

    def parent_of(self, worker_id: str, block_hash: int, medium: str = MEDIUM_GPU
                  ) -> int | None:
        return self._blocks.get(worker_id, {}).get(medium, {}).get(block_hash)

    # -- snapshot ------------------------------------------------------------------------------
    def snapshot(self) -> IndexSnapshot:
        blocks = {w: {m: list(b.items()) for m, b in meds.items() if b}
                  for w, meds in self._blocks.items()}
        return IndexSnapshot(self.group_idx, dict(self._next_seq), blocks)

    @classmethod
    def restore(cls, snap: IndexSnapshot) -> PrefixIndex:
        """A new index equal to the snapshot; continue by applying batches from `next_seq`."""
        index = cls(snap.group_idx)
        for worker_id, seq in snap.next_seq.items():
            index.add_worker(worker_id, seq)
            for medium, pairs in snap.blocks.get(worker_id, {}).items():
                blocks = index._blocks[worker_id].setdefault(medium, {})
                blocks.update(pairs)
                where = index._where_for(medium)
                bit = index._bit[worker_id]
                shared = index._shared_masks().setdefault
                for h in blocks:
                    m = where.get(h, 0) | bit
                    where[h] = shared(m, m)
        return index

    def check_integrity(self) -> None:
        """Raise AssertionError if the bitmask view and the per-worker truth disagree."""
        assert set(self._bit) == set(self._blocks) == set(self._next_seq)
        mask = 0
        for w, bit in self._bit.items():
            assert bit and bit & (bit - 1) == 0, f"{w}: bit {bit} not a power of two"
            assert self._names[bit.bit_length() - 1] == w
            mask |= bit
        assert mask == self._live_mask and len(self._names) == len(self._bit)
        for medium, where in self._where.items():
            expect: dict[int, int] = {}
            for w, meds in self._blocks.items():
                for h in meds.get(medium, {}):
                    expect[h] = expect.get(h, 0) | self._bit[w]
            assert where == expect, f"medium {medium}: worker masks disagree with blocks"
