"""CUDA-resident KV blocks for the GPU transports (`nccl`, `cuda_ipc`): checks, gather, scatter.

Two kinds of per-layer views (`views`):
- `"engine"`: meshd's embedded engine, one tensor per layer shaped `(2, num_blocks, block_size,
  num_kv_heads, head_dim)` (see `layout.py`); blocks are axis 1. A transfer of n blocks moves,
  per layer, `kv.index_select(1, ids)`: K halves then V halves in block-list order.
- `"vllm"`: vLLM 0.32's per-layer views `[num_blocks, H, N, C]` (RFC #42082; any physical
  order, usually strided views of one backing buffer); blocks are axis 0. A transfer moves, per
  layer, `view.index_select(0, ids)`: a dense `[n, H, N, C]` in *logical* order, so both peers
  agree whatever their physical layouts (the wire name says `+vllm-cuda-BHNC` on CUDA and
  `+vllm-BHNC` on CPU: the backends give C different meanings).

Both ends build the same per-layer buffers from their own block ids; the handshake compares
`BlockLayout`s and wire names, so an engine peer never meets a vLLM peer.

Memory: `GpuKV` keeps references to the engine's tensors (never copies or frees them); the
tensors must outlive it and must not be reallocated. `gather` returns new device tensors owned
by the caller; `scatter` writes only the named blocks, in place. All kernels are queued on the
caller's current CUDA stream; nothing here waits for them (building an index tensor copies a
short list from pageable host memory, which torch does synchronously on the current stream).
Importing this module needs no torch; constructing `GpuKV` does. `device_type="cpu"` exists so
the indexing is unit-tested on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from meshd.kv_transfer.layout import KV, BlockLayout

if TYPE_CHECKING:
    import torch

VIEWS = ("engine", "vllm")
# Wire-name suffixes of vLLM views (logical [B, H, N, C], what index_select(0) produces). The
# bytes of C mean different things per backend: CUDA backends (FlashAttention, Triton, flex)
# split each token's C into K then V; vLLM's CPU backend reads a head's block as all K rows,
# then all V rows. So a CUDA peer and a CPU peer never exchange vLLM KV (the handshake refuses).
VLLM_SUFFIX = "+vllm-BHNC"
VLLM_CUDA_SUFFIX = "+vllm-cuda-BHNC"


class GpuKV:
    """The engine's per-layer KV tensors on one device. Duck-compatible with `KVMemory` where
    `conn.py` uses it (`layout`, `num_blocks`, `check_ids`, `stream_bytes`, `wire_suffix`)."""

    def __init__(self, kv_caches: Sequence[torch.Tensor], layout: BlockLayout,
                 views: str = "engine", device_type: str = "cuda") -> None:
        if views not in VIEWS:
            raise ValueError(f"views: must be one of {VIEWS}, got {views!r}")
        if len(kv_caches) != layout.num_layers or not kv_caches:
            raise ValueError(
                f"kv_caches: {len(kv_caches)} tensors for a {layout.num_layers}-layer layout")
        self.layout = layout
        self.views = views
        self.block_dim = 1 if views == "engine" else 0
        self.wire_suffix = ("" if views == "engine" else
                            VLLM_CUDA_SUFFIX if device_type == "cuda" else VLLM_SUFFIX)
        first = kv_caches[0]
        self.num_blocks = int(first.shape[self.block_dim]) if first.dim() > self.block_dim else 0
        device = first.device
        for i, t in enumerate(kv_caches):
            if t.device.type != device_type or t.device != device:
                raise ValueError(f"kv_caches[{i}]: must be on one {device_type} device "
                                 f"({device}), got {t.device}")
            if str(t.dtype).removeprefix("torch.") != layout.dtype:
                raise ValueError(f"kv_caches[{i}]: dtype {t.dtype} != layout {layout.dtype}")
            problem = self._check_shape(t)
            if problem:
                raise ValueError(f"kv_caches[{i}]: {problem}")
        if device_type == "cuda" and device.index is None:
            raise ValueError("kv_caches: need tensors on an indexed CUDA device")
        self.layers = list(kv_caches)
        self.device = device
        self.device_index: int = device.index if device.index is not None else -1

    def _check_shape(self, t: torch.Tensor) -> str | None:
        if self.views == "engine":
            expected = self.layout.tensor_shape(self.num_blocks)
            if tuple(t.shape) != expected:
                return f"shape {tuple(t.shape)} != {expected}"
            if not t.is_contiguous():
                return "must be contiguous"
            return None
        if t.dim() != 4 or int(t.shape[0]) != self.num_blocks:
            return f"expected a [{self.num_blocks}, H, N, C] view, got {tuple(t.shape)}"
        per_block = math.prod(t.shape[1:]) * t.element_size()
        if per_block != self.layout.bytes_per_block_per_layer:
            return (f"a block holds {per_block} bytes, the layout says "
                    f"{self.layout.bytes_per_block_per_layer}")
        return None

    def block_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of one layer's transfer buffer for `num_blocks` blocks."""
        if self.views == "engine":
            return self.layout.tensor_shape(num_blocks)
        return (num_blocks, *self.layers[0].shape[1:])

    def same_block_dims(self, shape: Sequence[int]) -> bool:
        """Whether a peer tensor of `shape` has our per-block dims (any number of blocks)."""
        mine = tuple(self.layers[0].shape)
        if len(shape) != len(mine):
            return False
        if self.views == "engine":
            return shape[0] == KV and tuple(shape[2:]) == mine[2:]
        return tuple(shape[1:]) == mine[1:]

    def check_ids(self, block_ids: Sequence[int], what: str) -> str | None:
        bad = [b for b in block_ids if not 0 <= b < self.num_blocks]
        return f"{what}: ids {bad[:8]} outside 0..{self.num_blocks - 1}" if bad else None

    def stream_bytes(self, num_blocks: int) -> int:
        return num_blocks * self.layout.bytes_per_block

    def index(self, block_ids: Sequence[int]) -> torch.Tensor:
        import torch

        return torch.tensor(list(block_ids), dtype=torch.long, device=self.device)

    def gather(self, block_ids: Sequence[int]) -> list[torch.Tensor]:
        """Per layer, a new dense buffer holding the blocks in list order (queued copy)."""
        idx = self.index(block_ids)
        return [t.index_select(self.block_dim, idx) for t in self.layers]

    def gather_from(self, layers: Sequence[torch.Tensor], block_ids: Sequence[int]
                    ) -> list[torch.Tensor]:
        """`gather` over another process's mapped tensors of the same views (CUDA IPC)."""
        out = []
        local = self.index(block_ids)
        by_device: dict[object, torch.Tensor] = {}
        for t in layers:
            idx = by_device.get(t.device)
            if idx is None:
                idx = by_device[t.device] = local.to(t.device)
            out.append(t.index_select(self.block_dim, idx))
        return out

    def empty(self, num_blocks: int) -> list[torch.Tensor]:
        """Per layer, an uninitialized receive buffer for `num_blocks` blocks on this device."""
        import torch

        shape = self.block_shape(num_blocks)
        return [torch.empty(shape, dtype=t.dtype, device=self.device) for t in self.layers]

    def scatter(self, block_ids: Sequence[int], bufs: Sequence[torch.Tensor]) -> None:
        """Write `bufs` (as from `gather`/`empty`) into the named blocks (queued copy)."""
        idx = self.index(block_ids)
        for t, buf in zip(self.layers, bufs, strict=True):
            t.index_copy_(self.block_dim, idx, buf.to(t.device))


def wait_stream(stream: torch.cuda.Stream, deadline_s: float, on_timeout: str) -> None:
    """Block until the work queued so far on `stream` has finished, polling (no blocking CUDA
    sync) so a stalled peer cannot hold the thread past `deadline_s` (time.monotonic()).
    Raises KVTransferFailure(TIMEOUT) with `on_timeout` in the message."""
    import time

    import torch

    from meshd.kv_transfer.transport import ErrorCode, KVTransferFailure

    event = torch.cuda.Event()
    event.record(stream)
    pause = 20e-6
    while not event.query():
        if time.monotonic() > deadline_s:
            raise KVTransferFailure(ErrorCode.TIMEOUT, on_timeout)
        time.sleep(pause)
        pause = min(pause * 2, 1e-3)
