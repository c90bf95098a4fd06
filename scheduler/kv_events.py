"""Decoding vLLM KV cache event payloads (msgpack) into typed events.

vLLM publishes `KVEventBatch(ts, events, data_parallel_rank)` over ZMQ; each event is a msgspec
tagged struct. Two wire layouts exist and both are accepted:

- array-encoded (older vLLM, `array_like` structs): the batch is `[ts, [event, ...], dp_rank]`
  and an event is `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size,
  lora_id, medium, lora_name, extra_keys, group_idx, ...]`; trailing defaults may be omitted;
- map-encoded (newer): the batch is `{"ts", "events", "data_parallel_rank"}` and an event is a map
  with `"type": "BlockStored"` and the field names.

Block hashes arrive as unsigned ints (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`, the default) or as
raw digest bytes; bytes are normalized to ints exactly as vLLM does it: the digest read as a
big-endian integer, keeping the low 64 bits. The socket code lives in the coordinator; this module
only sees `(seq, payload)` pairs. A malformed payload raises `KVEventDecodeError`, never anything
else, so a consumer loop catches one type and counts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

MEDIUM_GPU = "GPU"
_MASK64 = (1 << 64) - 1


class KVEventDecodeError(ValueError):
    """A KV event payload could not be decoded; the message says what and where."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Full blocks a worker stored, in chain order; `parent_block_hash` precedes the first."""

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    medium: str = MEDIUM_GPU
    lora_id: int | None = None
    lora_name: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]
    medium: str = MEDIUM_GPU
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    medium: str | None = None  # vLLM sends none: every medium of the worker


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class KVEventBatch:
    seq: int
    ts: float
    events: tuple[KVEvent, ...]
    dp_rank: int | None = None

    def num_block_events(self) -> int:
        """Blocks stored plus blocks removed (the unit of the ingestion benchmark)."""
        n = 0
        for ev in self.events:
            if not isinstance(ev, AllBlocksCleared):
                n += len(ev.block_hashes)
        return n


def normalize_hash(h: object) -> int:
    """An engine block hash as an unsigned 64-bit int (bytes: big-endian, low 64 bits)."""
    if type(h) is int:
        return h & _MASK64
    if isinstance(h, bytes | bytearray | memoryview):
        return int.from_bytes(h, "big") & _MASK64
    raise KVEventDecodeError(f"block hash must be int or bytes, got {type(h).__name__}")


def _hashes(v: object, what: str) -> tuple[int, ...]:
    if not isinstance(v, list | tuple):
        raise KVEventDecodeError(f"{what}: block_hashes must be a list, got {type(v).__name__}")
    if all(type(h) is int and 0 <= h <= _MASK64 for h in v):
        return tuple(v)
    return tuple(normalize_hash(h) for h in v)


def _opt_int(v: object, what: str) -> int | None:
    if v is None or type(v) is int:
        return v
    raise KVEventDecodeError(f"{what}: expected int or null, got {type(v).__name__}")


def _medium(v: object) -> str:
    if v is None:
        return MEDIUM_GPU
    if isinstance(v, str):
        return v
    raise KVEventDecodeError(f"medium must be a string, got {type(v).__name__}")


_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                  "medium", "lora_name", "extra_keys", "group_idx")
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")


def _as_fields(raw: object, index: int) -> tuple[str, dict[str, Any]]:
    """(tag, {field: value}) from either event layout."""
    if isinstance(raw, dict):
        tag = raw.get("type")
        if not isinstance(tag, str):
            raise KVEventDecodeError(f"event {index}: map without a string 'type'")
        return tag, raw
    if isinstance(raw, list | tuple) and raw and isinstance(raw[0], str):
        tag = raw[0]
        names = {"BlockStored": _STORED_FIELDS, "BlockRemoved": _REMOVED_FIELDS}.get(tag, ())
        return tag, dict(zip(names, raw[1:], strict=False))
    raise KVEventDecodeError(f"event {index}: neither a tagged array nor a map with 'type'")


def decode_event(raw: object, index: int = 0) -> KVEvent:
    """One event from its msgpack-decoded form (either layout)."""
    tag, f = _as_fields(raw, index)
    where = f"event {index} ({tag})"
    try:
        if tag == "BlockStored":
            tokens = f.get("token_ids") or ()
            block_size = f.get("block_size")
            if type(block_size) is not int or block_size <= 0:
                raise KVEventDecodeError(f"{where}: block_size must be a positive int")
            parent = f.get("parent_block_hash")
            return BlockStored(
                block_hashes=_hashes(f.get("block_hashes"), where),
                parent_block_hash=None if parent is None else normalize_hash(parent),
                token_ids=tuple(tokens),
                block_size=block_size,
                medium=_medium(f.get("medium")),
                lora_id=_opt_int(f.get("lora_id"), where),
                lora_name=f.get("lora_name"),
                group_idx=_opt_int(f.get("group_idx"), where),
            )
        if tag == "BlockRemoved":
            return BlockRemoved(_hashes(f.get("block_hashes"), where), _medium(f.get("medium")),
                                _opt_int(f.get("group_idx"), where))
        if tag == "AllBlocksCleared":
            medium = f.get("medium")
            return AllBlocksCleared(None if medium is None else _medium(medium))
    except KVEventDecodeError:
        raise
    except (TypeError, ValueError) as e:
        raise KVEventDecodeError(f"{where}: {e}") from e
    raise KVEventDecodeError(f"{where}: unknown event type")


def decode_batch(seq: int, payload: bytes) -> KVEventBatch:
    """Decode one published `(seq, payload)` pair; raises only `KVEventDecodeError`."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types on corrupt input
        raise KVEventDecodeError(f"seq {seq}: not msgpack: {e}") from e
    if isinstance(raw, dict):
        ts, events, dp = raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank")
    elif isinstance(raw, list | tuple) and 2 <= len(raw) <= 3:
        ts, events, dp = raw[0], raw[1], raw[2] if len(raw) == 3 else None
    else:
        raise KVEventDecodeError(f"seq {seq}: batch is neither [ts, events, dp] nor a map")
    if not isinstance(ts, int | float) or not isinstance(events, list):
        raise KVEventDecodeError(f"seq {seq}: batch needs a numeric ts and an events list")
    try:
        decoded = tuple(decode_event(ev, i) for i, ev in enumerate(events))
    except KVEventDecodeError as e:
        raise KVEventDecodeError(f"seq {seq}: {e}") from e
    return KVEventBatch(seq, float(ts), decoded, _opt_int(dp, f"seq {seq}: data_parallel_rank"))


def encode_batch(batch: KVEventBatch, layout: str = "map") -> bytes:
    """The inverse of `decode_batch` in vLLM's wire form (tests, simulator, replay fixtures)."""
    evs: list[Any] = []
    for ev in batch.events:
        if isinstance(ev, BlockStored):
            vals = [list(ev.block_hashes), ev.parent_block_hash, list(ev.token_ids),
                    ev.block_size, ev.lora_id, ev.medium, ev.lora_name, None, ev.group_idx]
            evs.append(_pack("BlockStored", _STORED_FIELDS, vals, layout))
        elif isinstance(ev, BlockRemoved):
            vals = [list(ev.block_hashes), ev.medium, ev.group_idx]
            evs.append(_pack("BlockRemoved", _REMOVED_FIELDS, vals, layout))
        else:
            evs.append(_pack("AllBlocksCleared", (), [], layout))
    body: Any = ([batch.ts, evs, batch.dp_rank] if layout == "array" else
                 {"ts": batch.ts, "events": evs, "data_parallel_rank": batch.dp_rank})
    return msgpack.packb(body, use_bin_type=True)


def _pack(tag: str, names: tuple[str, ...], vals: list[Any], layout: str) -> Any:
    if layout == "array":
        return [tag, *vals]
    return {"type": tag, **dict(zip(names, vals, strict=True))}
