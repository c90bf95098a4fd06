import msgpack
import pytest

from meshd.scheduler.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVEventDecodeError,
    decode_batch,
    encode_batch,
    normalize_hash,
)

DIGEST = bytes(range(32))  # a sha256-sized digest
LOW64 = int.from_bytes(DIGEST[-8:], "big")


def make_batch() -> KVEventBatch:
    return KVEventBatch(7, 1.5, (
        BlockStored((1, 2), None, tuple(range(32)), 16, "GPU"),
        BlockRemoved((1,), "CPU"),
        AllBlocksCleared(),
    ), 0)


def test_normalize_bytes_takes_low_64_bits_big_endian() -> None:
    assert normalize_hash(DIGEST) == LOW64 == 0x18191A1B1C1D1E1F
    assert normalize_hash(b"\x01") == 1
    assert normalize_hash((1 << 70) + 5) == 5


@pytest.mark.parametrize("layout", ["array", "map"])
def test_round_trip_both_layouts(layout: str) -> None:
    assert decode_batch(7, encode_batch(make_batch(), layout)) == make_batch()


def test_old_array_layout_short_events_and_bytes_hashes() -> None:
    # Old vLLM: no medium/lora_name/group_idx fields, no dp rank, bytes hashes.
    raw = [2.0, [["BlockStored", [DIGEST], None, [5] * 16, 16, None],
                 ["BlockRemoved", [DIGEST]], ["AllBlocksCleared"]]]
    batch = decode_batch(3, msgpack.packb(raw, use_bin_type=True))
    assert batch.events == (BlockStored((LOW64,), None, (5,) * 16, 16, "GPU"),
                            BlockRemoved((LOW64,), "GPU"), AllBlocksCleared())
    assert batch.dp_rank is None and batch.num_block_events() == 2


def test_map_layout_with_extra_fields() -> None:
    raw = {"ts": 1, "data_parallel_rank": 2, "events": [
        {"type": "BlockStored", "block_hashes": [9], "parent_block_hash": DIGEST,
         "token_ids": [1] * 16, "block_size": 16, "lora_id": None, "medium": "CPU",
         "lora_name": None, "extra_keys": None, "group_idx": 1,
         "kv_cache_spec_kind": "full_attention"}]}
    ev = decode_batch(0, msgpack.packb(raw)).events[0]
    assert ev == BlockStored((9,), LOW64, (1,) * 16, 16, "CPU", group_idx=1)


@pytest.mark.parametrize("payload", [
    b"\xc1", b"", msgpack.packb(5), msgpack.packb([1.0]), msgpack.packb({"ts": "x", "events": []}),
    msgpack.packb([1.0, [["Nope"]]]), msgpack.packb([1.0, [{"type": 3}]]),
    msgpack.packb([1.0, [["BlockStored", "notalist", None, [], 16]]]),
    msgpack.packb([1.0, [["BlockStored", [1.5], None, [], 16]]]),
    msgpack.packb([1.0, [["BlockStored", [1], None, [], 0]]]),
    msgpack.packb([1.0, [["BlockRemoved", [1], 5]]]),
    msgpack.packb([1.0, [7]]),
    msgpack.packb([1.0, [], "rank"]),
])
def test_malformed_raises_typed_error(payload: bytes) -> None:
    with pytest.raises(KVEventDecodeError):
        decode_batch(1, payload)
