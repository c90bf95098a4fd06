"""How transports see the engine's KV tensors: the memory contracts and the factory.

- `BlockMemory`: what the shared connection code (`conn.py`) needs: the layout, the block count
  and id checks. `GpuKV` (CUDA transports) satisfies it.
- `ByteMemory`: a block list as a byte stream, for the byte transports (`tcp`, `shm`):
  `read` gives the source's stream (valid until the next read by that caller), `write` gives
  writable destination segments plus a `commit` that makes them land in the KV cache.
  Direct memories (`blocks.KVMemory`, `vllm_layout.BlockMajorMemory`) read and write the CPU
  tensors in place and commit nothing; `StagedKV` stages device KV through host buffers.

`byte_memory` picks one from where the tensors live and which views they are (`views`: meshd's
engine layout or vLLM's per-layer `[B, H, N, C]` views). The stream is the same for a direct CPU
peer and a staged peer of the same views (vLLM views: when the direct peer's blocks are in BHNC
order, vLLM's CPU layout), so for the engine's views a GPU prefill could feed a CPU decode over
TCP. vLLM's CUDA and CPU backends give a block's bytes different meanings, so their views get
different names (`gpu_blocks.VLLM_CUDA_SUFFIX`); `wire_suffix` is part of the transport name the
handshake compares, so differing streams never meet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from meshd.kv_transfer.gpu_blocks import GPU_CHUNK_BYTES, GpuKV, spans
from meshd.kv_transfer.streams import settle, wait_stream

if TYPE_CHECKING:
    import torch

    from meshd.kv_transfer.layout import BlockLayout
    from meshd.kv_transfer.transport import Deadline

Commit = Callable[["Deadline"], None]


class BlockMemory(Protocol):
    layout: BlockLayout
    num_blocks: int
    wire_suffix: str

    def check_ids(self, block_ids: Sequence[int], what: str) -> str | None: ...

    def stream_bytes(self, num_blocks: int) -> int: ...


class ByteMemory(BlockMemory, Protocol):
    def read(self, block_ids: Sequence[int], deadline: Deadline) -> list[memoryview]: ...

    def write(self, block_ids: Sequence[int]) -> tuple[list[memoryview], Commit]: ...


def byte_memory(kv_caches: Sequence[torch.Tensor], layout: BlockLayout,
                views: str = "engine") -> ByteMemory:
    """The byte-stream memory for `kv_caches`: in place on CPU, staged through host buffers on
    a GPU, or for CPU vLLM views whose blocks are not one dense byte range each."""
    if not kv_caches:
        raise ValueError("kv_caches: empty")
    if kv_caches[0].device.type != "cpu":
        return StagedKV(kv_caches, layout, views)
    if views == "vllm":
        from meshd.kv_transfer.vllm_layout import BlockMajorMemory, block_order

        try:
            block_order(kv_caches[0])
        except ValueError:
            return StagedKV(kv_caches, layout, views)
        return BlockMajorMemory(kv_caches, layout)
    if views != "engine":
        raise ValueError(f"views: must be 'engine' or 'vllm', got {views!r}")
    from meshd.kv_transfer.blocks import KVMemory

    return KVMemory(kv_caches, layout)


def _bytes(t: torch.Tensor) -> memoryview:
    import torch

    raw: Any = t.reshape(-1).view(torch.uint8).numpy()
    return memoryview(raw).cast("B")


class StagedKV:
    """Device KV (any torch device) as a byte stream through host buffers: `read` gathers the
    blocks on the device and copies them to host; `write` hands out host buffers whose `commit`
    copies them back and scatters them into the blocks. Per layer the stream is the logical
    buffer of `GpuKV.gather` (engine views: K halves then V halves, as `KVMemory`; vLLM views:
    `[n, H, N, C]`, as `BlockMajorMemory` over the CPU's LBHNC layout).

    Memory: never holds KV between calls; each `read`/`write` allocates its own host buffers
    for the whole block list (pinned on CUDA), so concurrent transfers share no state. On the
    device a call moves at most `chunk_bytes` of blocks per step, so its device memory does not
    grow with the prompt (`chunk_bytes`: default `GPU_CHUNK_BYTES` on CUDA, one step elsewhere).
    Waits poll against the deadline; after a failed commit, queued copies finish (bounded)
    before the failure is reported."""

    def __init__(self, kv_caches: Sequence[torch.Tensor], layout: BlockLayout,
                 views: str = "engine", chunk_bytes: int | None = None) -> None:
        device_type = kv_caches[0].device.type if kv_caches else "cuda"
        self._kv = GpuKV(kv_caches, layout, views, device_type=device_type)
        self._cuda = device_type == "cuda"
        if chunk_bytes is None:
            chunk_bytes = (GPU_CHUNK_BYTES if self._cuda
                           else max(1, self._kv.num_blocks) * layout.bytes_per_block)
        self._step = self._kv.blocks_per_step(chunk_bytes)
        self.layout = layout
        self.num_blocks = self._kv.num_blocks
        self.wire_suffix = self._kv.wire_suffix

    def check_ids(self, block_ids: Sequence[int], what: str) -> str | None:
        return self._kv.check_ids(block_ids, what)

    def stream_bytes(self, num_blocks: int) -> int:
        return self._kv.stream_bytes(num_blocks)

    def _host(self, num_blocks: int) -> list[torch.Tensor]:
        import torch

        shape = self._kv.block_shape(num_blocks)
        return [torch.empty(shape, dtype=t.dtype, pin_memory=self._cuda) for t in self._kv.layers]

    def _parts(self, whole: torch.Tensor, a: int, b: int, step_buf: torch.Tensor
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(part of `whole`, the matching part of a step's buffer) for blocks a..b, both
        contiguous, so each copy is one memcpy (engine views: the K and V halves apart)."""
        if self._kv.block_dim == 0:
            return [(whole[a:b], step_buf)]
        return [(whole[k, a:b], step_buf[k]) for k in range(whole.shape[0])]

    def _stream(self) -> tuple[torch.cuda.Stream | None, AbstractContextManager[Any]]:
        """A fresh CUDA stream and the context that makes it current (none on CPU)."""
        if not self._cuda:
            return None, contextlib.nullcontext()
        import torch

        stream = torch.cuda.Stream(device=self._kv.device)
        return stream, torch.cuda.stream(stream)

    def read(self, block_ids: Sequence[int], deadline: Deadline) -> list[memoryview]:
        ids = list(block_ids)
        host = self._host(len(ids))
        stream, on_stream = self._stream()
        with on_stream:
            for a, b in spans(len(ids), self._step):
                for h, buf in zip(host, self._kv.gather(ids[a:b]), strict=True):
                    for dst, src in self._parts(h, a, b, buf):
                        dst.copy_(src, non_blocking=self._cuda)
                del buf, src  # before the next step's: one step of device memory at a time
        if stream is not None:
            wait_stream(stream, deadline.at, "device to host staging copy")
        return [_bytes(h) for h in host]

    def write(self, block_ids: Sequence[int]) -> tuple[list[memoryview], Commit]:
        ids = list(block_ids)
        host = self._host(len(ids))

        def commit(deadline: Deadline) -> None:
            stream, on_stream = self._stream()
            try:
                with on_stream:
                    for a, b in spans(len(ids), self._step):
                        step_bufs = self._kv.empty(b - a)
                        for h, buf in zip(host, step_bufs, strict=True):
                            for src, dst in self._parts(h, a, b, buf):
                                dst.copy_(src, non_blocking=self._cuda)
                        self._kv.scatter(ids[a:b], step_bufs)
                        del step_bufs, buf, dst  # one step of device memory at a time
                if stream is not None:
                    wait_stream(stream, deadline.at, "host to device staging copy")
            except BaseException:
                if stream is not None:
                    settle(stream, "host to device staging copy")  # no late writes after this
                raise

        return [_bytes(h) for h in host], commit
