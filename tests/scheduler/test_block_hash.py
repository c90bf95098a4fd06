"""Block hashes against an independent reference of vLLM's sha256_cbor chaining."""

from __future__ import annotations

import hashlib
import struct

import pytest

from meshd.scheduler.block_hash import BlockHasher, block_hashes, none_hash, to_int64


def _cbor_text(s: str) -> bytes:
    """Minimal canonical CBOR for short text strings (major type 3)."""
    b = s.encode()
    assert len(b) < 24
    return bytes([0x60 | len(b)]) + b


def _cbor_uint(n: int) -> bytes:
    if n < 24:
        return bytes([n])
    if n < 256:
        return bytes([0x18, n])
    return bytes([0x19]) + struct.pack(">H", n)


def _ref_block(parent: bytes, tokens: list[int]) -> bytes:
    """sha256 of CBOR [bytes(32) parent, [uint...], null] written byte by byte."""
    enc = bytes([0x83, 0x58, 32]) + parent + bytes([0x80 | len(tokens)])
    enc += b"".join(_cbor_uint(t) for t in tokens) + bytes([0xF6])
    return hashlib.sha256(enc).digest()


def test_none_hash_is_sha256_of_cbor_seed_string() -> None:
    assert none_hash("0") == hashlib.sha256(_cbor_text("0")).digest()
    assert none_hash("12345") == hashlib.sha256(_cbor_text("12345")).digest()
    assert none_hash(None) == none_hash("vllm-none-hash")  # vLLM >= 0.32 with no PYTHONHASHSEED
    assert len(none_hash(None)) == 32


@pytest.mark.parametrize(("n_tokens", "block_size", "n_blocks"),
                         [(0, 4, 0), (3, 4, 0), (4, 4, 1), (11, 4, 2), (33, 16, 2)])
def test_chain_matches_reference(n_tokens: int, block_size: int, n_blocks: int) -> None:
    tokens = [(i * 37 + 5) % 300 for i in range(n_tokens)]
    got = block_hashes(tokens, block_size, seed="0")
    assert len(got) == n_blocks
    parent = none_hash("0")
    for i, h in enumerate(got):
        parent = _ref_block(parent, tokens[i * block_size:(i + 1) * block_size])
        assert h == parent


def test_known_vector() -> None:
    # Fixed expectation computed once from the reference encoding above (regression guard).
    h = block_hashes([1, 2, 3, 4], 4, seed="0")[0]
    assert h == _ref_block(hashlib.sha256(b"\x610").digest(), [1, 2, 3, 4])
    assert to_int64(h) == int.from_bytes(h[-8:], "big")


def test_to_int64_is_low_64_bits_unsigned() -> None:
    assert to_int64(bytes(24) + b"\xff" * 8) == 2**64 - 1
    assert to_int64(b"\x01" * 24 + b"\x00" * 7 + b"\x05") == 5
    assert to_int64(b"\x80" + bytes(31)) == 0


def test_seed_and_extra_keys_change_hashes() -> None:
    t = list(range(8))
    assert block_hashes(t, 4, "0") != block_hashes(t, 4, "1")
    assert block_hashes(t, 4, "0") != block_hashes(t, 4, "0", extra_keys=("salt",))


def test_parent_continues_chain_and_incremental_hasher_agrees() -> None:
    t = list(range(20))
    full = block_hashes(t, 4, "0")
    assert block_hashes(t[8:], 4, "0", parent=full[1]) == full[2:]
    hasher, hs = BlockHasher(4, "0"), list[bytes]()
    for i in range(len(t) + 1):
        hasher.extend(hs, t[:i])
    assert hs == full


def test_bad_block_size() -> None:
    with pytest.raises(ValueError, match="block_size"):
        block_hashes([1], 0, "0")
