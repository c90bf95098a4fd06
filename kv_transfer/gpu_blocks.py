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
caller's current CUDA stream; nothing here waits for them (an index tensor is copied from
pinned host memory without a host sync, so a stalled transfer queued earlier on the stream
cannot block the thread here; stream waits with deadlines are in `streams.py`).
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
# Device memory one transfer step may allocate (gather/receive buffers, all layers). vLLM runs
# with most of the GPU given to its KV cache, so a transfer never sizes buffers to the request
# (a 128k-token prompt of an 8B model is 16 GiB of KV): it moves at most this much per step.
GPU_CHUNK_BYTES = 64 << 20


def spans(n: int, step: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of at most `step` covering range(n)."""
    if step < 1:
        raise ValueError(f"step: must be >= 1, got {step}")
    return [(a, min(a + step, n)) for a in range(0, n, step)]


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

    def blocks_per_step(self, chunk_bytes: int, layers: int | None = None) -> int:
        """How many blocks one step moves so that its buffers for `layers` layers (default:
        all) stay within `chunk_bytes`; at least one. Peers that step together (NCCL) compute
        it from the same `chunk_bytes` and the same (handshake-checked) layout."""
        layers = self.layout.num_layers if layers is None else layers
        return max(1, chunk_bytes // (layers * self.layout.bytes_per_block_per_layer))

    def index(self, block_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Block ids as an index tensor on our device, copied from pinned host memory on the
        current stream without a host sync (torch keeps the pinned buffer until the copy ran).
        An index tensor is returned as is."""
        import torch

        if isinstance(block_ids, torch.Tensor):
            return block_ids
        host = torch.tensor(list(block_ids), dtype=torch.long)
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def gather(self, block_ids: Sequence[int] | torch.Tensor,
               out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per layer, a dense buffer holding the blocks in list order (queued copy): new
        buffers, or `out` (as from `empty`/`streams.step_buffers`) filled in place."""
        import torch

        idx = self.index(block_ids)
        if out is None:
            return [t.index_select(self.block_dim, idx) for t in self.layers]
        for t, o in zip(self.layers, out, strict=True):
            torch.index_select(t, self.block_dim, idx, out=o)
        return list(out)

    def copy_from(self, layers: Sequence[torch.Tensor], remote_ids: Sequence[int],
                  local_ids: Sequence[int], chunk_bytes: int = GPU_CHUNK_BYTES) -> None:
        """Copy blocks of another process's mapped tensors of the same views (CUDA IPC) into
        ours, one layer and at most `chunk_bytes` at a time (queued; another GPU's blocks are
        gathered there, then peer-copied: torch orders the copy after the gather on the
        source's current stream and before our scatter on ours)."""
        if len(remote_ids) != len(local_ids):
            raise ValueError(f"{len(remote_ids)} remote ids for {len(local_ids)} local ids")
        step = self.blocks_per_step(chunk_bytes, layers=1)
        local = self.index(local_ids)
        remote = self.index(remote_ids)
        by_device: dict[object, torch.Tensor] = {self.device: remote}
        for mine, theirs in zip(self.layers, layers, strict=True):
            idx = by_device.get(theirs.device)
            if idx is None:
                idx = by_device[theirs.device] = remote.to(theirs.device)
            for a, b in spans(len(local_ids), step):
                part = theirs.index_select(self.block_dim, idx[a:b])
                mine.index_copy_(self.block_dim, local[a:b], part.to(mine.device))
                del part  # before the next step's allocation: one step of memory at a time

    def empty(self, num_blocks: int) -> list[torch.Tensor]:
        """Per layer, an uninitialized buffer for `num_blocks` blocks on this device."""
        import torch

        shape = self.block_shape(num_blocks)
        return [torch.empty(shape, dtype=t.dtype, device=self.device) for t in self.layers]

    # -- step buffers for transfers queued on a stream of their own (NCCL) --------------------

    def step_buffers(self, max_blocks: int, used_on: torch.cuda.Stream) -> list[torch.Tensor]:
        """Per layer, flat byte buffers for up to `max_blocks` blocks from the device's shared
        pool, for use on `used_on` (`streams.step_buffers`); see `shaped`."""
        import torch

        from meshd.kv_transfer.streams import step_buffers

        nbytes = max_blocks * self.layout.bytes_per_block_per_layer
        return step_buffers([(nbytes,)] * len(self.layers), [torch.uint8] * len(self.layers),
                            self.device_index, used_on)

    def shaped(self, flat: Sequence[torch.Tensor], num_blocks: int) -> list[torch.Tensor]:
        """Views of `step_buffers` as dense per-layer buffers of `num_blocks` blocks (a prefix
        of each, so a shorter last step is still contiguous)."""
        nbytes = num_blocks * self.layout.bytes_per_block_per_layer
        shape = self.block_shape(num_blocks)
        return [f[:nbytes].view(t.dtype).view(shape) for f, t in zip(flat, self.layers,
                                                                      strict=True)]

    def index_on(self, block_ids: Sequence[int], used_on: torch.cuda.Stream) -> torch.Tensor:
        """`index` allocated from the shared pool and copied on `used_on` (current stream)."""
        import torch

        from meshd.kv_transfer.streams import step_buffers

        host = torch.tensor(list(block_ids), dtype=torch.long).pin_memory()
        (idx,) = step_buffers([tuple(host.shape)], [torch.long], self.device_index, used_on)
        with torch.cuda.stream(used_on):
            idx.copy_(host, non_blocking=True)
        return idx

    def scatter(self, block_ids: Sequence[int] | torch.Tensor,
                bufs: Sequence[torch.Tensor]) -> None:
        """Write `bufs` (as from `gather`/`empty`) into the named blocks (queued copy)."""
        idx = self.index(block_ids)
        for t, buf in zip(self.layers, bufs, strict=True):
            t.index_copy_(self.block_dim, idx, buf.to(t.device))
