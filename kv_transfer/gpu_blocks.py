"""CUDA-resident KV blocks for the GPU transports (`nccl`, `cuda_ipc`): checks, gather, scatter.

The engine's cache is one CUDA tensor per layer shaped `(2, num_blocks, block_size, num_kv_heads,
head_dim)` (see `layout.py`). A transfer of n blocks moves, per layer, the `(2, n, ...)` tensor
`kv.index_select(1, ids)`: K halves then V halves, in block-list order, the same logical stream
as `blocks.py` uses on the CPU.

Memory: `GpuKV` keeps references to the engine's tensors (never copies or frees them); the
tensors must outlive it and must not be reallocated. `gather` returns new device tensors owned
by the caller; `scatter` writes only the named blocks, in place. All kernels are queued on the
caller's current CUDA stream; nothing here synchronizes. Importing this module needs no torch;
constructing `GpuKV` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from meshd.kv_transfer.layout import BlockLayout

if TYPE_CHECKING:
    import torch


class GpuKV:
    """The engine's per-layer CUDA KV tensors. Duck-compatible with `KVMemory` where `conn.py`
    uses it (`layout`, `num_blocks`, `check_ids`, `stream_bytes`)."""

    def __init__(self, kv_caches: Sequence[torch.Tensor], layout: BlockLayout) -> None:
        if len(kv_caches) != layout.num_layers:
            raise ValueError(
                f"kv_caches: {len(kv_caches)} tensors for a {layout.num_layers}-layer layout")
        self.layout = layout
        self.num_blocks = int(kv_caches[0].shape[1]) if kv_caches else 0
        expected = layout.tensor_shape(self.num_blocks)
        device = kv_caches[0].device if kv_caches else None
        for i, t in enumerate(kv_caches):
            if tuple(t.shape) != expected:
                raise ValueError(f"kv_caches[{i}]: shape {tuple(t.shape)} != {expected}")
            if not t.is_cuda or t.device != device:
                raise ValueError(f"kv_caches[{i}]: must be on one CUDA device ({device}), "
                                 f"got {t.device}")
            if not t.is_contiguous():
                raise ValueError(f"kv_caches[{i}]: must be contiguous")
            if str(t.dtype).removeprefix("torch.") != layout.dtype:
                raise ValueError(f"kv_caches[{i}]: dtype {t.dtype} != layout {layout.dtype}")
        if device is None or device.index is None:
            raise ValueError("kv_caches: need at least one tensor on an indexed CUDA device")
        self.layers = list(kv_caches)
        self.device = device
        self.device_index: int = device.index

    def check_ids(self, block_ids: Sequence[int], what: str) -> str | None:
        bad = [b for b in block_ids if not 0 <= b < self.num_blocks]
        return f"{what}: ids {bad[:8]} outside 0..{self.num_blocks - 1}" if bad else None

    def stream_bytes(self, num_blocks: int) -> int:
        return num_blocks * self.layout.bytes_per_block

    def index(self, block_ids: Sequence[int]) -> torch.Tensor:
        import torch

        return torch.tensor(list(block_ids), dtype=torch.long, device=self.device)

    def gather(self, block_ids: Sequence[int]) -> list[torch.Tensor]:
        """Per layer, a new contiguous `(2, n, ...)` tensor holding the blocks (queued copy)."""
        idx = self.index(block_ids)
        return [t.index_select(1, idx) for t in self.layers]

    def empty(self, num_blocks: int) -> list[torch.Tensor]:
        """Per layer, an uninitialized `(2, n, ...)` receive buffer on this device."""
        import torch

        shape = self.layout.tensor_shape(num_blocks)
        return [torch.empty(shape, dtype=t.dtype, device=self.device) for t in self.layers]

    def scatter(self, block_ids: Sequence[int], bufs: Sequence[torch.Tensor]) -> None:
        """Write `bufs` (as from `gather`/`empty`) into the named blocks (queued copy)."""
        idx = self.index(block_ids)
        for t, buf in zip(self.layers, bufs, strict=True):
            t.index_copy_(1, idx, buf)


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
