"""Block events the block manager emits, in vLLM's KV-event vocabulary.

Plain data for the KV-events publisher (which converts hashes with
`meshd.scheduler.block_hash.to_int64` and encodes them). Hashes here are full 32-byte digests.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Consecutive blocks of one sequence entered the prefix cache.

    `token_ids` holds `len(block_hashes) * block_size` tokens in order; `parent_hash` is the
    digest of the block before the first one (None for the first block of a sequence).
    """

    block_hashes: tuple[bytes, ...]
    parent_hash: bytes | None
    token_ids: tuple[int, ...]
    block_size: int

    @property
    def parent_block_hash(self) -> bytes | None:
        """vLLM's field name for `parent_hash` (what the KV-events encoder reads)."""
        return self.parent_hash


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks left the prefix cache (evicted for reuse)."""

    block_hashes: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The whole prefix cache was dropped."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
