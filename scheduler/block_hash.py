"""Chained prefix-cache block hashes, byte-identical to vLLM's `sha256_cbor` mode.

vLLM (`vllm/v1/core/kv_cache_utils.py`, `vllm/utils/hashing.py`) hashes each *full* block of
`block_size` tokens as

    sha256(cbor2.dumps((parent_hash, tuple(block_tokens), extra_keys), canonical=True))

where `parent_hash` is the previous block's digest, or `NONE_HASH` for the first block.
`NONE_HASH` is `sha256(cbor2.dumps(seed, canonical=True))` where `seed` is the *string* value of
`PYTHONHASHSEED`. With it unset, vLLM 0.32 uses the fixed seed "vllm-none-hash" for its sha256
modes (older releases drew 32 random bytes per process; the xxhash modes still do), which
`none_hash(None)` reproduces; checked against real vLLM 0.32 payloads in tests/vllm. A falsy
parent (None or b"") means "first block".

KV events publish a hash as the low 64 bits of the digest, unsigned: the last 8 bytes read
big-endian (`to_int64`).

Pure: no torch, no I/O. The caller passes the seed (env vars are read in `meshd.env` only).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import cbor2

_MASK64 = (1 << 64) - 1
# vLLM's seed for NONE_HASH when PYTHONHASHSEED is unset (sha256 / sha256_cbor modes, >= 0.32).
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"


def sha256_cbor(obj: Any) -> bytes:
    """SHA-256 of the canonical CBOR encoding of `obj` (tuples encode as CBOR arrays)."""
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def none_hash(seed: str | None) -> bytes:
    """The root hash for the first block: `sha256_cbor(seed)`; None means vLLM's default seed."""
    return sha256_cbor(DEFAULT_NONE_HASH_SEED if seed is None else seed)


def hash_block(parent: bytes | None, tokens: Sequence[int], extra_keys: tuple[Any, ...] | None,
               root: bytes) -> bytes:
    """Digest of one block given its parent's digest (falsy parent: `root`, i.e. NONE_HASH)."""
    return sha256_cbor((parent or root, tuple(tokens), extra_keys))


def block_hashes(token_ids: Sequence[int], block_size: int, seed: str | None,
                 extra_keys: tuple[Any, ...] | None = None,
                 parent: bytes | None = None) -> list[bytes]:
    """Chained digests of every full block of `token_ids` (a trailing partial block is skipped).

    `parent` continues an existing chain (the digest of the block before `token_ids[0]`).
    Raises ValueError if `block_size` < 1.
    """
    if block_size < 1:
        raise ValueError(f"block_size: must be >= 1, got {block_size}")
    root = none_hash(seed)
    out: list[bytes] = []
    prev = parent
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        prev = hash_block(prev, token_ids[start:start + block_size], extra_keys, root)
        out.append(prev)
    return out


def to_int64(h: bytes) -> int:
    """The unsigned low-64-bit form vLLM publishes in KV events (big-endian, masked)."""
    return int.from_bytes(h, byteorder="big") & _MASK64


class BlockHasher:
    """Incremental hasher with a fixed seed and extra keys; cheap to call once per new block."""

    __slots__ = ("block_size", "extra_keys", "root")

    def __init__(self, block_size: int, seed: str | None,
                 extra_keys: tuple[Any, ...] | None = None) -> None:
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        self.block_size = block_size
        self.extra_keys = extra_keys
        self.root = none_hash(seed)

    def extend(self, hashes: list[bytes], token_ids: Sequence[int]) -> None:
        """Append to `hashes` the digests of full blocks of `token_ids` not yet hashed."""
        bs = self.block_size
        prev = hashes[-1] if hashes else None
        for start in range(len(hashes) * bs, len(token_ids) - bs + 1, bs):
            prev = hash_block(prev, token_ids[start:start + bs], self.extra_keys, self.root)
            hashes.append(prev)
