"""CUDA IPC transport for engines on one host: the decode side maps the prefill side's KV tensors
and copies blocks device to device (peer to peer across GPUs when the driver allows it).

Control runs over meshd's authenticated loopback/TCP connection (`conn.py`); IPC handles go to
the peer only after the mutual handshake:

    client -> server  fetch      {request_id, block_ids, chunk_bytes}   (as in tcp.py)
    server -> client  ipc_stream {total, layers: [share, ...]}   one share per layer tensor
    client            map each share (cached by handle), copy remote blocks -> local blocks
    client -> server  ack {ok, message}

A share is what `torch.multiprocessing.reductions.reduce_tensor` puts in a CUDA tensor's pickle,
as plain msgpack fields (no pickle): `Storage._share_cuda_()` returns the `cudaIpcGetMemHandle`
handle of the caching allocator's *base* allocation plus this storage's byte offset in it (a raw
`cupy.cuda.runtime.ipcGetMemHandle(tensor.data_ptr())` would be wrong for a tensor that does not
start its allocation), and a shared-memory ref counter that keeps the producer's allocator from
reusing the block while a consumer maps it. `rebuild_cuda_tensor` calls `cudaIpcOpenMemHandle`
(once per handle per process; torch caches it) and rebuilds a tensor over the mapping.

Memory: the server exports views of the engine's tensors once, at construction; the engine must
not free them before `close()`. The client keeps one peer's mappings while that peer sends the
same shares (`Mappings`: replaced when they change, as after a prefill restart; at most
`MAX_PEERS` peers), reads only the named remote blocks and writes only the named local blocks,
one layer and at most `gpu_blocks.GPU_CHUNK_BYTES` at a time (a copy from another GPU is
gathered there first, so that GPU gets up to one step of temporary memory). CUDA IPC works
only between processes on one host (a process cannot open its own handle), and the producer's
GPU must be visible to the consumer: shares name the GPU by UUID and the consumer maps it to its
own index (the vLLM launcher gives cuda_ipc workers every agent GPU, their own first).
"""

from __future__ import annotations

import functools
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from meshd.kv_transfer.conn import (
    MIN_CHUNK,
    Handler,
    run_fetch,
)
from meshd.kv_transfer.gpu_blocks import GPU_CHUNK_BYTES, GpuKV
from meshd.kv_transfer.streams import settle, wait_stream
from meshd.kv_transfer.transport import (
    Deadline,
    ErrorCode,
    KVTransferFailure,
    Peer,
    TransferResult,
)
from meshd.kv_transfer.wire import recv_msg, send_msg

if TYPE_CHECKING:
    import torch

    from meshd.kv_transfer.auth import Authenticator
    from meshd.kv_transfer.layout import BlockLayout

NAME = "cuda_ipc"
MAX_PEERS = 32  # client side: peers whose mappings are kept (least recently used dropped)
STREAM = {"total": int, "layers": list}
SHARE = {"device": int, "handle": bytes, "size_bytes": int, "offset_bytes": int,
         "ref_handle": bytes, "ref_offset": int, "event_handle": bytes, "event_sync": bool,
         "tensor_offset": int, "device_uuid": str, "shape": list, "stride": list}


def export_share(t: torch.Tensor) -> dict[str, Any]:
    """The IPC share of one CUDA tensor (call in the process that allocated it). Contract of
    `_share_cuda_`: (device, cudaIpcMemHandle of the base allocation, storage bytes, storage
    offset in that allocation, ref-counter shm name, its offset, cudaIpcEventHandle, whether
    the consumer must wait on that event before reading)."""
    (device, handle, size, offset, ref_handle, ref_offset, event_handle,
     event_sync) = t.untyped_storage()._share_cuda_()
    import torch

    uuid = str(torch.cuda.get_device_properties(t.device).uuid)
    return {"device_uuid": uuid, "device": int(device), "handle": bytes(handle),
            "size_bytes": int(size),
            "offset_bytes": int(offset), "ref_handle": bytes(ref_handle or b""),
            "ref_offset": int(ref_offset), "event_handle": bytes(event_handle or b""),
            "event_sync": bool(event_sync), "tensor_offset": int(t.storage_offset()),
            "shape": [int(d) for d in t.shape], "stride": [int(d) for d in t.stride()]}


def check_share(share: Any, kv: GpuKV) -> dict[str, Any]:
    """A peer's share, checked: every field typed, and a tensor view with our per-block dims
    (its block count is the peer's own) that lies inside the shared allocation."""
    if not isinstance(share, dict) or set(share) != set(SHARE) or any(
            not isinstance(share[k], t) or isinstance(share[k], bool) != (t is bool)
            for k, t in SHARE.items()):
        raise KVTransferFailure(ErrorCode.PROTOCOL, "ipc_stream.layers: malformed share")
    shape, stride = share["shape"], share["stride"]
    if (len(shape) != len(stride) or not all(_is_int(v) and v >= 0 for v in [*shape, *stride])
            or not kv.same_block_dims(shape)):
        raise KVTransferFailure(ErrorCode.LAYOUT_MISMATCH,
                                f"peer KV view {shape} does not match ours "
                                f"{list(kv.layers[0].shape)} (per-block dims)")
    itemsize = kv.layers[0].element_size()
    span = (share["tensor_offset"] + sum((d - 1) * s for d, s in zip(shape, stride, strict=True))
            + 1) * itemsize
    if share["tensor_offset"] < 0 or 0 in shape or span > share["size_bytes"]:
        raise KVTransferFailure(ErrorCode.PROTOCOL, "ipc_stream.layers: view exceeds its storage")
    return share


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def open_share(share: dict[str, Any], like: torch.Tensor) -> torch.Tensor:
    """Map a peer's (checked) share as a tensor of `like`'s dtype with the peer's own shape and
    strides. The mapping lives while the tensor does."""
    import torch
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    device = local_index(share["device_uuid"])
    return cast("torch.Tensor", rebuild_cuda_tensor(
        torch.Tensor, tuple(share["shape"]), tuple(share["stride"]), share["tensor_offset"],
        torch.UntypedStorage,
        like.dtype, device, share["handle"], share["size_bytes"],
        share["offset_bytes"], False, share["ref_handle"], share["ref_offset"],
        share["event_handle"] or None, share["event_sync"]))


def local_index(device_uuid: str) -> int:
    """This process's index of the GPU with `device_uuid`. The producer's index means nothing
    here (each worker has its own CUDA_VISIBLE_DEVICES); the peer's GPU must be visible to us."""
    import torch

    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == device_uuid:
            return i
    raise KVTransferFailure(ErrorCode.PEER_ERROR,
                            f"peer GPU {device_uuid} is not visible in this process "
                            f"(CUDA_VISIBLE_DEVICES must include it)")


def share_key(share: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies one mapped view: torch's own IPC cache key (handle, storage offset in the
    allocation) plus the view (separate layer tensors often share one allocator segment)."""
    return (share["handle"], share["offset_bytes"], share["tensor_offset"],
            tuple(share["shape"]), tuple(share["stride"]))


class Mappings:
    """The client's mapped peer tensors, per peer. A peer's mappings are reused while it sends
    the same shares and replaced when they change (a restarted prefill exports new handles; the
    old tensors are dropped, so torch closes those mappings); beyond `max_peers` the least
    recently used peer's are dropped. Dropping is safe while a copy from them is queued: torch's
    IPC storage keeps the mapping until the tensors are collected, and a running fetch holds
    them. `open_share` is the mapping function (injected for tests)."""

    def __init__(self, open_share: Callable[[dict[str, Any]], Any],
                 max_peers: int = MAX_PEERS) -> None:
        self._open = open_share
        self._max = max_peers
        self._peers: OrderedDict[Peer, tuple[tuple[Any, ...], list[Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, peer: Peer, shares: Sequence[dict[str, Any]]) -> list[Any]:
        key = tuple(share_key(s) for s in shares)
        with self._lock:  # one mapping pass at a time, so a peer is mapped once
            hit = self._peers.get(peer)
            if hit is not None and hit[0] == key:
                self._peers.move_to_end(peer)
                return hit[1]
            self._peers.pop(peer, None)
            by_key: dict[tuple[Any, ...], Any] = {}
            for k, share in zip(key, shares, strict=True):
                if k not in by_key:
                    by_key[k] = self._open(share)
            mapped = [by_key[k] for k in key]
            self._peers[peer] = (key, mapped)
            while len(self._peers) > self._max:
                self._peers.popitem(last=False)
            return mapped

    def peers(self) -> int:
        with self._lock:
            return len(self._peers)

    def clear(self) -> None:
        with self._lock:
            self._peers.clear()


class CudaIpcSender:
    """The CUDA IPC transport's serving half (a `mux.MuxServer` listens, authenticates and
    checks the fetch): hands out IPC shares of the engine's KV tensors.

    Memory: exports the tensors once; never reads or writes them itself."""

    def __init__(self, kv_caches: Sequence[torch.Tensor], layout: BlockLayout,
                 views: str = "engine") -> None:
        self._kv = GpuKV(kv_caches, layout, views)
        self.name = NAME + self._kv.wire_suffix
        self._shares = [export_share(t) for t in self._kv.layers]
        self.handler = Handler(self._kv, self._stream)

    def close(self) -> None:
        pass  # consumers hold their own mappings; torch's ref counter keeps the memory

    def _stream(self, sock: socket.socket, block_ids: list[int], _chunk: int,
                deadline: Deadline) -> int:
        total = self._kv.stream_bytes(len(block_ids))
        send_msg(sock, {"t": "ipc_stream", "total": total, "layers": self._shares}, deadline)
        return total  # the client copies; its ack (read by serve_connection) ends the transfer


class CudaIpcClient:
    """Copies remote blocks from mapped peer tensors into local blocks (see `TransportClient`).

    Memory: writes only the local blocks named in a fetch; mappings are kept per peer
    (`Mappings`) until `close()`. Thread-safe: each fetch uses its own stream."""

    name = NAME

    def __init__(self, kv_caches: Sequence[torch.Tensor], layout: BlockLayout,
                 auth: Authenticator, views: str = "engine",
                 chunk_bytes: int = GPU_CHUNK_BYTES) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes: must be >= 1, got {chunk_bytes}")
        self._kv = GpuKV(kv_caches, layout, views)
        self.name = NAME + self._kv.wire_suffix
        self._auth = auth
        self._chunk_bytes = chunk_bytes
        self._mappings = Mappings(self._open)

    def close(self) -> None:
        self._mappings.clear()

    def fetch(self, peer: Peer, remote_request_id: str, remote_block_ids: Sequence[int],
              local_block_ids: Sequence[int], timeout_s: float) -> TransferResult:
        request = (remote_request_id, remote_block_ids, local_block_ids)
        return run_fetch(self.name, self._kv, self._auth, peer, request, timeout_s,
                         functools.partial(self._pull, peer))

    def _open(self, share: dict[str, Any]) -> torch.Tensor:
        try:
            return open_share(share, self._kv.layers[0])
        except RuntimeError as exc:  # cudaIpcOpenMemHandle failed
            raise KVTransferFailure(ErrorCode.PEER_ERROR, f"cannot map peer KV: {exc}") from exc

    def _remote_layers(self, peer: Peer, shares: list[Any]) -> list[torch.Tensor]:
        if len(shares) != len(self._kv.layers) or not all(isinstance(s, dict) for s in shares):
            raise KVTransferFailure(ErrorCode.PROTOCOL,
                                    f"ipc_stream: {len(shares)} shares for "
                                    f"{len(self._kv.layers)} layers")
        return self._mappings.get(peer, [check_share(s, self._kv) for s in shares])

    def _pull(self, peer: Peer, sock: socket.socket, request_id: str,
              remote_block_ids: Sequence[int], local_block_ids: Sequence[int],
              deadline: Deadline, progress: list[int]) -> None:
        import torch

        send_msg(sock, {"t": "fetch", "request_id": request_id,
                        "block_ids": list(remote_block_ids), "chunk_bytes": MIN_CHUNK}, deadline)
        msg = recv_msg(sock, "ipc_stream", STREAM, deadline)
        total = self._kv.stream_bytes(len(local_block_ids))
        if msg["total"] != total:
            raise KVTransferFailure(ErrorCode.PROTOCOL,
                                    f"server announced {msg['total']} bytes, expected {total}")
        remote = self._remote_layers(peer, msg["layers"])
        stream = torch.cuda.Stream(device=self._kv.device)
        try:
            with torch.cuda.stream(stream):
                self._kv.copy_from(remote, remote_block_ids, local_block_ids, self._chunk_bytes)
            wait_stream(stream, deadline.at, "cuda_ipc copy")
        except BaseException:
            settle(stream, "cuda_ipc copy")  # no late writes after we report the failure
            raise
        progress[0] += total
        send_msg(sock, {"t": "ack", "ok": True, "message": ""}, deadline)


def make_client(kv_caches: Sequence[torch.Tensor], layout: BlockLayout, auth: Authenticator,
                **options: Any) -> CudaIpcClient:
    return CudaIpcClient(kv_caches, layout, auth, **options)


def make_sender(kv_caches: Sequence[torch.Tensor], layout: BlockLayout,
                **options: Any) -> CudaIpcSender:
    return CudaIpcSender(kv_caches, layout, **options)
