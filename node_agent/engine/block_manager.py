"""Paged KV-cache block bookkeeping with prefix caching. Plain data: no torch, no I/O.

Blocks are ids `0..num_blocks-1`. A block is *referenced* (ref_cnt > 0, owned by one or more
block tables) or *free* (ref_cnt == 0, in the free queue). A free block may still be *cached*:
it keeps its hash and can be revived by a prefix hit until it is evicted on reuse.

The free queue is a doubly linked list threaded through the blocks (O(1) pop, append, remove,
no allocation on the hot path). Freed cached blocks go to the tail (evicted last, LRU order);
freed uncached blocks go to the head (reused first). Allocation pops the head and evicts its hash.

Callers own block tables (lists of ids); this class only counts references. Events go to the
`on_event` callback synchronously, in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from meshd.node_agent.engine.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


class NoFreeBlocksError(RuntimeError):
    """`allocate` asked for more blocks than are free; check `can_allocate` first."""


class _Block:
    __slots__ = ("block_hash", "block_id", "next", "prev", "ref_cnt")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None
        self.prev: _Block | None = None
        self.next: _Block | None = None


class _FreeQueue:
    """Doubly linked list with sentinels; every operation O(1)."""

    __slots__ = ("head", "size", "tail")

    def __init__(self, blocks: Iterable[_Block]) -> None:
        self.head = _Block(-1)
        self.tail = _Block(-2)
        self.head.next, self.tail.prev = self.tail, self.head
        self.size = 0
        for b in blocks:
            self.append(b)

    def _insert(self, b: _Block, before: _Block) -> None:
        after_prev = before.prev
        assert after_prev is not None
        b.prev, b.next = after_prev, before
        after_prev.next = b
        before.prev = b
        self.size += 1

    def append(self, b: _Block) -> None:
        self._insert(b, self.tail)

    def appendleft(self, b: _Block) -> None:
        assert self.head.next is not None
        self._insert(b, self.head.next)

    def remove(self, b: _Block) -> None:
        assert b.prev is not None and b.next is not None
        b.prev.next, b.next.prev = b.next, b.prev
        b.prev = b.next = None
        self.size -= 1

    def popleft(self) -> _Block:
        b = self.head.next
        assert b is not None and b is not self.tail
        self.remove(b)
        return b

    def __iter__(self) -> Iterator[_Block]:
        b = self.head.next
        while b is not None and b is not self.tail:
            yield b
            b = b.next


@dataclass(slots=True)
class PrefixStats:
    """Prefix-cache counters in tokens (vLLM `prefix_cache_queries` / `prefix_cache_hits`)."""

    queries: int = 0
    hits: int = 0


class BlockManager:
    """Reference-counted block pool with a hash-keyed prefix cache and LRU eviction."""

    def __init__(self, num_blocks: int, block_size: int,
                 on_event: Callable[[KVEvent], None] | None = None) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got "
                             f"{num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free = _FreeQueue(self._blocks)
        self._cached: dict[bytes, _Block] = {}
        self._on_event = on_event
        self.stats = PrefixStats()

    # -- queries (no mutation) ---------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now (free, cached or not)."""
        return self._free.size

    def usage(self) -> float:
        """Fraction of blocks referenced, 0..1 (vLLM `kv_cache_usage_perc`)."""
        return 1.0 - self._free.size / self.num_blocks

    def can_allocate(self, n: int) -> bool:
        return n <= self._free.size

    def lookup(self, block_hashes: Sequence[bytes]) -> list[int]:
        """Ids of the longest cached prefix of `block_hashes`; does not take references."""
        out: list[int] = []
        for h in block_hashes:
            b = self._cached.get(h)
            if b is None:
                break
            out.append(b.block_id)
        return out

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_cnt

    def block_hash(self, block_id: int) -> bytes | None:
        return self._blocks[block_id].block_hash

    # -- mutation ----------------------------------------------------------------------------
    def record_query(self, queried_tokens: int, hit_tokens: int) -> None:
        """Count one prefix-cache lookup (in tokens) for the stats."""
        self.stats.queries += queried_tokens
        self.stats.hits += hit_tokens

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take one more reference on each block (revives free cached blocks from the queue)."""
        for bid in block_ids:
            b = self._blocks[bid]
            if b.ref_cnt == 0:
                self._free.remove(b)
            b.ref_cnt += 1

    def allocate(self, n: int) -> list[int]:
        """Take `n` fresh blocks (ref_cnt 1, no hash), evicting cached hashes as needed.

        Raises NoFreeBlocksError (and changes nothing) if fewer than `n` are free.
        """
        if n > self._free.size:
            raise NoFreeBlocksError(f"need {n} blocks, {self._free.size} free")
        out: list[int] = []
        removed: list[bytes] = []
        for _ in range(n):
            b = self._free.popleft()
            if b.block_hash is not None:
                del self._cached[b.block_hash]
                removed.append(b.block_hash)
                b.block_hash = None
            b.ref_cnt = 1
            out.append(b.block_id)
        if removed:
            self._emit(BlockRemoved(tuple(removed)))
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference per block, in reverse order so a table's tail is evicted first."""
        for bid in reversed(block_ids):
            b = self._blocks[bid]
            if b.ref_cnt <= 0:
                raise ValueError(f"block {bid} freed with ref_cnt {b.ref_cnt}")
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                if b.block_hash is None:
                    self._free.appendleft(b)
                else:
                    self._free.append(b)

    def cache_blocks(self, block_ids: Sequence[int], block_hashes: Sequence[bytes],
                     parent_hash: bytes | None, token_ids: Sequence[int]) -> None:
        """Register full, computed, referenced blocks under their chained hashes.

        `token_ids` holds exactly the tokens of these blocks. A block already cached or whose
        hash is taken by another block is skipped. Emits BlockStored per consecutive run.
        """
        bs = self.block_size
        if len(block_ids) != len(block_hashes) or len(token_ids) != bs * len(block_ids):
            raise ValueError("cache_blocks: ids, hashes and tokens disagree in length")
        run: list[bytes] = []
        run_start = 0
        parent = parent_hash
        for i, (bid, h) in enumerate(zip(block_ids, block_hashes, strict=True)):
            b = self._blocks[bid]
            if b.ref_cnt == 0:
                raise ValueError(f"cache_blocks: block {bid} is not referenced")
            if b.block_hash is None and h not in self._cached:
                b.block_hash = h
                self._cached[h] = b
                if not run:
                    run_start = i
                run.append(h)
                continue
            self._flush(run, parent, token_ids[run_start * bs:(run_start + len(run)) * bs])
            run = []
            parent = h
        self._flush(run, parent, token_ids[run_start * bs:(run_start + len(run)) * bs])

    def clear_cache(self) -> None:
        """Forget every hash (referenced blocks stay allocated) and emit AllBlocksCleared."""
        for b in self._cached.values():
            b.block_hash = None
        self._cached.clear()
        self._emit(AllBlocksCleared())

    # -- invariants --------------------------------------------------------------------------
    def check_integrity(self, tables: Iterable[Sequence[int]] | None = None) -> None:
        """Raise AssertionError if an invariant is broken.

        Free queue holds exactly the ref_cnt-0 blocks, once each, consistently linked; the hash
        map and block hashes agree; with `tables`, ref counts equal occurrences in them.
        """
        seen: set[int] = set()
        for b in self._free:
            assert b.block_id not in seen, f"block {b.block_id} twice in free queue"
            assert b.ref_cnt == 0, f"block {b.block_id} free with ref_cnt {b.ref_cnt}"
            assert b.next is not None and b.next.prev is b, "free queue links broken"
            seen.add(b.block_id)
        assert len(seen) == self._free.size, "free queue size mismatch"
        for b in self._blocks:
            assert b.ref_cnt >= 0, f"block {b.block_id} negative ref_cnt"
            if b.ref_cnt == 0:
                assert b.block_id in seen, f"block {b.block_id} unreferenced but not free"
            if b.block_hash is not None:
                assert self._cached.get(b.block_hash) is b, f"block {b.block_id} hash unmapped"
        for h, b in self._cached.items():
            assert b.block_hash == h, f"hash map points at block {b.block_id} with other hash"
        if tables is not None:
            counts = [0] * self.num_blocks
            for t in tables:
                for bid in t:
                    counts[bid] += 1
            for b in self._blocks:
                assert counts[b.block_id] == b.ref_cnt, (
                    f"block {b.block_id}: ref_cnt {b.ref_cnt} != {counts[b.block_id]} in tables")

    def _flush(self, run: list[bytes], parent: bytes | None, tokens: Sequence[int]) -> None:
        if run:
            self._emit(BlockStored(tuple(run), parent, tuple(tokens), self.block_size))

    def _emit(self, event: KVEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)
