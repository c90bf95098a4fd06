"""Byte views of registered KV tensors, and how a block list becomes a chunked byte stream.

A transfer moves a logical byte stream: for each layer, the K halves of the blocks in list
order, then the V halves. Both ends build the same stream shape from their own block ids, so
the source reads its blocks and the destination writes its (differently numbered) blocks with
no staging copy. Runs of consecutive block ids are coalesced into one range, since in the
`(2, num_blocks, ...)` layout block b+1's K half directly follows block b's.

Memory: `KVMemory` holds `memoryview`s of the engine's tensors (CPU, contiguous); it never
copies or frees them. The tensors must outlive it and must not be reallocated.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from meshd.kv_transfer.layout import KV, BlockLayout

if TYPE_CHECKING:
    from meshd.kv_transfer.transport import Deadline

DEFAULT_CHUNK_BYTES = 4 << 20


class KVMemory:
    """The engine's per-layer KV tensors, seen as raw bytes (a `memory.ByteMemory`; read and
    written in place, so `write`'s commit does nothing)."""

    wire_suffix = ""  # part of the transport name compared in the handshake

    def __init__(self, kv_caches: Sequence[torch.Tensor], layout: BlockLayout) -> None:
        if len(kv_caches) != layout.num_layers:
            raise ValueError(
                f"kv_caches: {len(kv_caches)} tensors for a {layout.num_layers}-layer layout"
            )
        self.layout = layout
        self.num_blocks = kv_caches[0].shape[1] if kv_caches else 0
        expected = layout.tensor_shape(self.num_blocks)
        self._layers: list[memoryview] = []
        for i, t in enumerate(kv_caches):
            if tuple(t.shape) != expected:
                raise ValueError(f"kv_caches[{i}]: shape {tuple(t.shape)} != {expected}")
            if str(t.dtype).removeprefix("torch.") != layout.dtype:
                raise ValueError(f"kv_caches[{i}]: dtype {t.dtype} != {layout.dtype}")
            if t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError(f"kv_caches[{i}]: must be a contiguous CPU tensor")
            raw: Any = t.view(-1).view(torch.uint8).numpy()  # shares the tensor's storage
            self._layers.append(memoryview(raw).cast("B"))

    def check_ids(self, block_ids: Sequence[int], what: str) -> str | None:
        """None if every id is a valid block index; else the reason."""
        bad = [b for b in block_ids if not 0 <= b < self.num_blocks]
        return f"{what}: block ids {bad[:8]} outside 0..{self.num_blocks - 1}" if bad else None

    def segments(self, block_ids: Sequence[int]) -> list[memoryview]:
        """The stream's byte ranges for `block_ids`, in stream order, coalesced."""
        half = self.layout.half_bytes
        runs = _runs(block_ids)
        out: list[memoryview] = []
        for layer in self._layers:
            for kv in range(KV):
                base = kv * self.num_blocks
                for start, count in runs:
                    off = (base + start) * half
                    out.append(layer[off : off + count * half])
        return out

    def stream_bytes(self, num_blocks: int) -> int:
        return num_blocks * self.layout.bytes_per_block

    def read(self, block_ids: Sequence[int], deadline: Deadline) -> list[memoryview]:
        return self.segments(block_ids)

    def write(self, block_ids: Sequence[int]
              ) -> tuple[list[memoryview], Callable[[Deadline], None]]:
        return self.segments(block_ids), _no_commit


def _no_commit(_deadline: Deadline) -> None:
    return None


def _runs(block_ids: Sequence[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


def chunks(segments: Sequence[memoryview], chunk_bytes: int) -> Iterator[list[memoryview]]:
    """Cut the concatenation of `segments` into chunks of `chunk_bytes` (the last may be
    shorter); each chunk is a list of views into the segments, no copies."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes: must be > 0, got {chunk_bytes}")
    current: list[memoryview] = []
    room = chunk_bytes
    for seg in segments:
        while len(seg):
            take = min(room, len(seg))
            current.append(seg[:take])
            seg = seg[take:]
            room -= take
            if room == 0:
                yield current
                current, room = [], chunk_bytes
    if current:
        yield current


def crc32(pieces: Sequence[memoryview]) -> int:
    crc = 0
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
    return crc


def nbytes(pieces: Sequence[memoryview]) -> int:
    return sum(len(p) for p in pieces)
