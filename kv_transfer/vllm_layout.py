"""vLLM's KV cache tensors as meshd block memory (no vllm import; torch only).

vLLM 0.32 allocates one backing buffer and hands the connector one 4-D view per layer,
`[num_blocks, H, N, C]` in logical order (RFC #42082). On the CPU backend (layout `LBHNC`, the
only one `CPUAttentionBackend` supports) a layer's view is `[num_blocks, num_kv_heads,
block_size, 2 * head_dim]`: within one block the K rows (`N` of them) and V rows of each head are
interleaved per head, so **one block of one layer is a single contiguous byte range** of
`2 * block_size * num_kv_heads * head_dim * itemsize` bytes, blocks `block_stride` apart. That
differs from meshd's FlashAttention stream (K halves of all blocks, then V halves), so the
adapter here streams, per layer, whole blocks in list order, and the byte transports (`tcp`,
`shm`) over it are named after the physical block order (`wire_suffix`, e.g. `tcp+vllm-BHNC`):
the handshake compares transport names, so a peer with another layout is refused instead of
receiving reordered bytes. Views whose blocks are not dense (other vLLM layouts, CUDA) go
through `memory.StagedKV`, which streams the logical `[n, H, N, C]` order.

`BlockLayout` is still exchanged as is: its byte counts (`bytes_per_block`) equal the
block-major stream's, and its fields (layers, KV heads, head dim, dtype, block size) must match.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from meshd.kv_transfer.blocks import KVMemory, _runs
from meshd.kv_transfer.layout import BlockLayout

LOGICAL_DIMS = "BHNC"  # vLLM's per-layer logical axes: block, head, token-in-block, content


def block_order(t: torch.Tensor) -> str:
    """Physical order of a per-layer view's inner axes (outermost first), e.g. "HNC".

    Raises ValueError unless one block (`t[b]`) is one dense byte range."""
    if t.dim() != 4:
        raise ValueError(f"expected a 4-D [B, H, N, C] KV view, got shape {tuple(t.shape)}")
    inner = sorted(((t.stride(d), t.shape[d], d) for d in (1, 2, 3)), key=lambda x: x[0])
    expected = 1
    for stride, size, _ in inner:
        if size > 1 and stride != expected:
            raise ValueError(
                f"a block of shape {tuple(t.shape[1:])} strides {t.stride()[1:]} is not one "
                "dense byte range; the meshd connector needs block-contiguous layouts (CPU LBHNC)"
            )
        expected *= size
    return "".join(LOGICAL_DIMS[d] for _, _, d in reversed(inner))


class BlockMajorMemory(KVMemory):
    """Per-layer `[B, ...]` views where each block is one dense byte range.

    Stream order: for each layer, the blocks in list order (runs of consecutive ids coalesced
    when blocks are densely packed). Holds memoryviews of the tensors' storage; never copies."""

    def __init__(self, kv_caches: Sequence[torch.Tensor], layout: BlockLayout) -> None:
        if len(kv_caches) != layout.num_layers:
            raise ValueError(
                f"kv_caches: {len(kv_caches)} tensors for a {layout.num_layers}-layer layout"
            )
        if not kv_caches:
            raise ValueError("kv_caches: empty")
        self.layout = layout
        self.num_blocks = int(kv_caches[0].shape[0])
        self.order = block_order(kv_caches[0])
        self.wire_suffix = f"+vllm-B{self.order}"
        block_bytes = layout.bytes_per_block_per_layer
        self._blocks: list[tuple[memoryview, int, int]] = []  # (storage bytes, offset, stride)
        seen: set[int] = set()
        for i, t in enumerate(kv_caches):
            if t.device.type != "cpu":
                raise ValueError(f"kv_caches[{i}]: must be a CPU tensor, is on {t.device}")
            if str(t.dtype).removeprefix("torch.") != layout.dtype:
                raise ValueError(f"kv_caches[{i}]: dtype {t.dtype} != {layout.dtype}")
            if int(t.shape[0]) != self.num_blocks or block_order(t) != self.order:
                raise ValueError(f"kv_caches[{i}]: shape {tuple(t.shape)} / strides {t.stride()} "
                                 f"differ from layer 0's")
            if t[0].numel() * t.element_size() != block_bytes:
                raise ValueError(
                    f"kv_caches[{i}]: a block holds {t[0].numel() * t.element_size()} bytes, "
                    f"the layout says {block_bytes}"
                )
            if t.data_ptr() in seen:
                raise ValueError(f"kv_caches[{i}]: shares its memory with an earlier layer")
            seen.add(t.data_ptr())
            storage = t.untyped_storage()
            raw: Any = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()
            isz = t.element_size()
            offset, stride = int(t.storage_offset()) * isz, int(t.stride(0)) * isz
            end = offset + (self.num_blocks - 1) * stride + block_bytes
            if offset < 0 or end > storage.nbytes():
                raise ValueError(f"kv_caches[{i}]: view exceeds its storage")
            self._blocks.append((memoryview(raw).cast("B"), offset, stride))

    def segments(self, block_ids: Sequence[int]) -> list[memoryview]:
        size = self.layout.bytes_per_block_per_layer
        runs = _runs(block_ids)
        out: list[memoryview] = []
        for mem, offset, stride in self._blocks:
            dense = stride == size
            for start, count in runs:
                if dense:
                    off = offset + start * stride
                    out.append(mem[off : off + count * size])
                else:
                    for b in range(start, start + count):
                        off = offset + b * stride
                        out.append(mem[off : off + size])
        return out


def layout_of(kv_caches: Sequence[torch.Tensor], num_kv_heads: int, head_dim: int,
              block_size: int) -> BlockLayout:
    """The `BlockLayout` of vLLM per-layer views, checked against the attention spec."""
    if not kv_caches:
        raise ValueError("kv_caches: empty")
    t = kv_caches[0]
    layout = BlockLayout(
        num_layers=len(kv_caches), num_kv_heads=num_kv_heads, head_dim=head_dim,
        dtype=str(t.dtype).removeprefix("torch."), block_size=block_size,
    )
    got = math.prod(t.shape[1:]) * t.element_size()
    if got != layout.bytes_per_block_per_layer:
        raise ValueError(
            f"KV view {tuple(t.shape)} holds {got} bytes per block; a {block_size}-token block "
            f"of {num_kv_heads} KV heads x {head_dim} needs {layout.bytes_per_block_per_layer}"
        )
    return layout
