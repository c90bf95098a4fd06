"""The transport contract: pull KV blocks from a peer engine into local blocks.

Two roles per transport:
- **server** (prefill side, "source"): serves the blocks it holds for a request. It finds them
  through a `BlockSource` the engine provides and tells the engine when they have been read.
- **client** (decode side): `fetch()` pulls a remote request's blocks into local block ids.

Contracts shared by every transport:
- Memory: the engine owns the per-layer KV tensors. A transport keeps views of them from
  `register`/construction until `close()`; the engine must not reallocate them meanwhile.
  `fetch` writes only into the given local blocks. If it returns `ok=False` their contents are
  unspecified and the engine must not use them (recompute or fail the request).
- Errors are data: `fetch` never raises for network, peer, auth or integrity problems; it
  returns `TransferResult(ok=False, error=TransferError(code, message))`. It raises only for
  caller bugs (bad arguments, unregistered memory): `ValueError`.
- Deadlines: every `fetch` takes `timeout_s`; it returns by then (plus scheduling slack).
- Threads: `fetch` blocks the calling thread; call it from a worker thread, not from an asyncio
  loop. One client may serve concurrent fetches from several threads.

Transports are looked up by name with lazy imports, so GPU-only ones (`nccl`, `cuda_ipc`)
import cupy only when chosen.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

if TYPE_CHECKING:
    import torch

    from meshd.kv_transfer.auth import Authenticator
    from meshd.kv_transfer.conn import ServerConfig
    from meshd.kv_transfer.layout import BlockLayout
    from meshd.kv_transfer.mux import MuxServer, Sender

ViewKind = Literal["engine", "vllm"]
VIEW_KINDS: tuple[ViewKind, ...] = ("engine", "vllm")


class ErrorCode(StrEnum):
    TIMEOUT = "timeout"  # the deadline passed (stalled or slow peer)
    CONNECT = "connect"  # could not reach the peer
    AUTH = "auth"  # peer failed authentication, or refused ours
    LAYOUT_MISMATCH = "layout_mismatch"
    UNKNOWN_REQUEST = "unknown_request"  # the source holds no blocks for that request id
    BAD_BLOCKS = "bad_blocks"  # block ids not held for the request, or counts differ
    CORRUPT = "corrupt"  # checksum mismatch
    TRUNCATED = "truncated"  # the stream ended early
    PROTOCOL = "protocol"  # malformed frame, wrong length or sequence, schema violation
    PEER_ERROR = "peer_error"  # the peer reported a failure of its own
    INTERNAL = "internal"


@dataclass(frozen=True, slots=True)
class TransferError:
    code: ErrorCode
    message: str

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


class TransferResult(NamedTuple):
    ok: bool
    bytes: int  # payload bytes moved into local blocks (on failure: how far it got)
    seconds: float
    error: TransferError | None = None


class Peer(NamedTuple):
    """Where a source serves blocks (what the prefill side reports as remote_host/remote_port)."""

    host: str
    port: int


class KVTransferFailure(Exception):
    """Internal to transports: raised inside, converted to a TransferResult at the API edge."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.error = TransferError(code, message)


class Deadline:
    """An absolute monotonic deadline. `remaining()` raises KVTransferFailure(TIMEOUT) once past."""

    __slots__ = ("at", "what")

    def __init__(self, timeout_s: float, what: str = "operation") -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: must be > 0, got {timeout_s}")
        self.at = time.monotonic() + timeout_s
        self.what = what

    def remaining(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise KVTransferFailure(ErrorCode.TIMEOUT, f"deadline passed during {self.what}")
        return left


@dataclass(frozen=True, slots=True)
class KVViews:
    """The KV memory a transport reads (serving) or writes (pulling): the engine's per-layer
    `tensors` (the engine owns them and must not reallocate them while a transport built over
    them is open), their `layout`, and which views they are (`kind`, the transports' `views`
    option): `engine` for meshd's `(2, B, N, H, D)` layers, `vllm` for vLLM's per-layer
    `[B, H, N, C]` views."""

    tensors: Sequence[torch.Tensor]
    layout: BlockLayout
    kind: ViewKind = "engine"

    def __post_init__(self) -> None:
        if self.kind not in VIEW_KINDS:
            raise ValueError(f"KVViews.kind: must be one of {VIEW_KINDS}, got {self.kind!r}")


class BlockSource(Protocol):
    """What the engine gives a server. Called from transport threads: must be thread-safe and
    must not wait on the engine loop."""

    def lookup(self, request_id: str) -> Sequence[int] | None:
        """Block ids held for `request_id` (the engine's internal id), or None if not held.
        The engine must keep these blocks unchanged until `on_sent` or its own lease timeout."""
        ...

    def on_sent(self, request_id: str) -> None:
        """The peer confirmed it received the request's blocks intact; the engine may free them."""
        ...


class TransportClient(Protocol):
    """Decode side. Owns no KV memory; holds views of the tensors it was built with."""

    name: str

    def fetch(
        self,
        peer: Peer,
        remote_request_id: str,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        timeout_s: float,
    ) -> TransferResult:
        """Copy remote blocks (in order) into local blocks (same order, same count)."""
        ...

    def close(self) -> None: ...


class TransportServer(Protocol):
    """Prefill side. Serves from background threads; `address` is valid after construction."""

    name: str

    @property
    def address(self) -> Peer: ...

    def close(self) -> None: ...


# name -> module under meshd.kv_transfer. Each module defines
#   make_client(kv_caches, layout, auth, **options) -> TransportClient
#   make_sender(kv_caches, layout, **options) -> mux.Sender: the serving half (wire name,
#       `conn.Handler`, close); `mux.MuxServer` listens and authenticates for one or several
_REGISTRY: dict[str, str] = {
    "tcp": "meshd.kv_transfer.tcp",
    "shm": "meshd.kv_transfer.shm",
    "nccl": "meshd.kv_transfer.nccl",
    "cuda_ipc": "meshd.kv_transfer.cuda_ipc",
}


def available_transports() -> list[str]:
    return sorted(_REGISTRY)


def _load(name: str) -> Any:
    if name not in _REGISTRY:
        raise ValueError(f"unknown transport {name!r}; valid: {', '.join(available_transports())}")
    try:
        return importlib.import_module(_REGISTRY[name])
    except ModuleNotFoundError as exc:
        raise ValueError(f"transport {name!r} is not available here: {exc}") from exc


def make_client(
    name: str,
    kv_caches: Sequence[torch.Tensor],
    layout: BlockLayout,
    auth: Authenticator,
    **options: Any,
) -> TransportClient:
    """Build the decode-side client of transport `name` over the engine's KV tensors."""
    client: TransportClient = _load(name).make_client(kv_caches, layout, auth, **options)
    return client


def make_sender(name: str, kv_caches: Sequence[torch.Tensor], layout: BlockLayout,
                **options: Any) -> Sender:
    """The serving half of transport `name` over the engine's KV tensors (no listener)."""
    sender: Sender = _load(name).make_sender(kv_caches, layout, **options)
    return sender


def make_server(
    name: str,
    kv_caches: Sequence[torch.Tensor],
    layout: BlockLayout,
    auth: Authenticator,
    source: BlockSource,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    config: ServerConfig | None = None,
    **options: Any,
) -> MuxServer:
    """Start the prefill-side server of transport `name`; it listens until `close()`. (A
    `mux.MuxServer` with one sender; `mux.make_mux_server` serves several on one port.)"""
    from meshd.kv_transfer.mux import MuxServer

    sender = make_sender(name, kv_caches, layout, **options)
    try:
        return MuxServer([sender], [name], auth, source, host, port, config)
    except BaseException:
        sender.close()
        raise
