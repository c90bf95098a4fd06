"""Helpers for tests and benchmarks: deterministic KV tensors and a server in its own process.

`run_server_process` is a top-level function so `multiprocessing` (spawn) can start it; keys and
secrets travel as bytes, never pickled objects of ours beyond plain tuples.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from collections.abc import Sequence
from typing import Any

import torch

from meshd.kv_transfer.auth import Authenticator, Ed25519Authenticator, SharedSecretAuthenticator
from meshd.kv_transfer.layout import BlockLayout
from meshd.kv_transfer.transport import make_server


def make_kv(layout: BlockLayout, num_blocks: int, seed: int | None) -> list[torch.Tensor]:
    """Per-layer KV tensors; random (reproducible from `seed`) or zeros when seed is None."""
    dtype = getattr(torch, layout.dtype)
    shape = layout.tensor_shape(num_blocks)
    if seed is None:
        return [torch.zeros(shape, dtype=dtype) for _ in range(layout.num_layers)]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype) for _ in range(layout.num_layers)]


def make_auth(spec: tuple[str, bytes, Sequence[bytes]]) -> Authenticator:
    """("ed25519", seed32, trusted public keys) or ("hmac", secret, ())."""
    kind, key, trusted = spec
    if kind == "ed25519":
        from nacl.signing import SigningKey

        return Ed25519Authenticator(SigningKey(key), trusted)
    return SharedSecretAuthenticator(key, "test")


class DictSource:
    """A `BlockSource` over a dict; records `on_sent` calls. Thread-safe."""

    def __init__(self, held: dict[str, list[int]]) -> None:
        self._held = dict(held)
        self._lock = threading.Lock()
        self.sent: list[str] = []
        self.sent_event = threading.Event()

    def lookup(self, request_id: str) -> list[int] | None:
        with self._lock:
            return self._held.get(request_id)

    def on_sent(self, request_id: str) -> None:
        with self._lock:
            self.sent.append(request_id)
            self._held.pop(request_id, None)
        self.sent_event.set()


def run_server_process(
    transport: str,
    layout: dict[str, Any],
    num_blocks: int,
    seed: int,
    auth: tuple[str, bytes, list[bytes]],
    held: dict[str, list[int]],
    ready: mp.Queue[Any],
    events: mp.Queue[Any],
    stop: Any,
) -> None:
    """Serve `held` from seeded tensors until `stop` (an mp.Event) is set. Puts the port on
    `ready` and each `on_sent` request id on `events`."""
    kv = make_kv(BlockLayout.from_dict(layout), num_blocks, seed)

    class _Source(DictSource):
        def on_sent(self, request_id: str) -> None:
            super().on_sent(request_id)
            events.put(request_id)

    server = make_server(transport, kv, BlockLayout.from_dict(layout), make_auth(auth),
                         _Source(held))
    ready.put(server.address.port)
    stop.wait(120)
    server.close()
