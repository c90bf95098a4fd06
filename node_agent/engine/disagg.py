"""The disaggregation contract (vLLM's NixlConnector proxy protocol) for the embedded engine.

Prefill side (`kv_transfer_params.do_remote_decode`): the request runs with
`hold_blocks_on_finish`; if it stopped by the length cap its blocks are put under a **lease**
keyed by the engine-internal request id (`remote_request_id`), served by the kv_transfer
server through `Leases` (a `BlockSource`), and described in the response's
`kv_transfer_params`. The lease ends when the peer confirms an intact copy (`on_sent`), when
the request is aborted, or after `lease_timeout_s` (counted as expired). A fetch that starts
(`lookup`) renews the lease so that blocks are never freed under a transfer in flight.

Decode side (`do_remote_prefill`): `Puller.pull` allocates import blocks, fetches them on a
worker thread with a deadline and reports whether the request may run with `imported=True`;
on any failure the import blocks are freed and the request is prefilled locally (counted by
reason). The client gets the same tokens either way.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from meshd.kv_transfer.auth import Authenticator, Ed25519Authenticator, SharedSecretAuthenticator
from meshd.kv_transfer.layout import BlockLayout
from meshd.kv_transfer.transport import Peer, TransportClient, make_client
from meshd.node_agent.engine.api import KVLayout
from meshd.node_agent.engine.async_engine import AsyncEngine
from meshd.node_agent.engine.engine import Engine, NoFreeBlocksError

log = logging.getLogger(__name__)

RENEW_MARGIN_S = 1.0
T = TypeVar("T")


def block_layout(layout: KVLayout) -> BlockLayout:
    return BlockLayout(layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype,
                       layout.block_size)


def make_authenticator(secret: bytes, node_key: str, trusted_keys: str,
                       node_id: str) -> Authenticator:
    """Ed25519 when a node key file and a trusted-keys file are given, else the mesh secret."""
    if node_key:
        from pathlib import Path

        from meshd.node_agent import identity

        ident = identity.load(node_key)
        lines = Path(trusted_keys).read_text().split()
        return Ed25519Authenticator(ident.signing_key, [bytes.fromhex(k) for k in lines])
    return SharedSecretAuthenticator(secret, node_id)


@dataclass(slots=True)
class DisaggStats:
    """Counters for /metrics; mutated under `lock` from loop, transport and step threads."""

    pulled_bytes: int = 0
    pull_seconds: float = 0.0
    pulls_ok: int = 0
    pull_failures: dict[str, int] = field(default_factory=dict)  # by ErrorCode value
    fallbacks: dict[str, int] = field(default_factory=dict)  # local prefill, by reason
    leases_granted: int = 0
    leases_sent: int = 0
    leases_expired: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, table: dict[str, int], key: str) -> None:
        with self.lock:
            table[key] = table.get(key, 0) + 1


class Leases:
    """Held prefill blocks, by engine request id, with deadlines. A `BlockSource`.

    Thread-safe. `lookup`/`on_sent` run on transport threads; `grant`, `forget` and `expire`
    run on the step thread with the engine lock held (so they never take it); `on_sent` takes
    the engine lock only after dropping this object's lock.
    """

    def __init__(self, driver: AsyncEngine, timeout_s: float, stats: DisaggStats,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._driver, self._timeout_s, self._stats, self._clock = driver, timeout_s, stats, clock
        self._lock = threading.Lock()
        self._held: dict[str, tuple[tuple[int, ...], float]] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def get(self, request_id: str) -> tuple[int, ...] | None:
        with self._lock:
            entry = self._held.get(request_id)
        return entry[0] if entry else None

    def grant(self, request_id: str, block_ids: tuple[int, ...]) -> None:
        with self._lock:
            self._held[request_id] = (block_ids, self._clock() + self._timeout_s)
        with self._stats.lock:
            self._stats.leases_granted += 1

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._held.pop(request_id, None)

    def lookup(self, request_id: str) -> list[int] | None:
        with self._lock:
            entry = self._held.get(request_id)
            if entry is None:
                return None
            renewed = max(entry[1], self._clock() + self._timeout_s + RENEW_MARGIN_S)
            self._held[request_id] = (entry[0], renewed)
            return list(entry[0])

    def on_sent(self, request_id: str) -> None:
        with self._lock:
            entry = self._held.pop(request_id, None)
        if entry is None:
            return
        self._driver.run_locked(lambda e: e.release_held(request_id))
        with self._stats.lock:
            self._stats.leases_sent += 1

    def expire(self, engine: Engine) -> None:
        """Step-thread housekeeping (engine lock held): free leases past their deadline."""
        now = self._clock()
        with self._lock:
            if not self._held:
                return
            gone = [rid for rid, (_, at) in self._held.items() if at <= now]
            for rid in gone:
                del self._held[rid]
        for rid in gone:
            engine.release_held(rid)
            log.info("lease of %s expired; blocks freed", rid)
        if gone:
            with self._stats.lock:
                self._stats.leases_expired += len(gone)


@dataclass(frozen=True, slots=True)
class RemotePrefill:
    """The decode side's view of a prefill response's `kv_transfer_params`."""

    peer: Peer
    request_id: str
    block_ids: tuple[int, ...]
    engine_id: str
    transport: str
    prompt_digest: str | None

    @staticmethod
    def parse(params: dict[str, Any], default_transport: str) -> RemotePrefill | str:
        """The parsed params, or why they are unusable (a fallback reason)."""
        host, port = params.get("remote_host"), params.get("remote_port")
        rid, blocks = params.get("remote_request_id"), params.get("remote_block_ids")
        if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool):
            return "bad_params"
        if not isinstance(rid, str) or not isinstance(blocks, list) or not all(
                isinstance(b, int) and not isinstance(b, bool) for b in blocks):
            return "bad_params"
        transport = params.get("meshd_transport", default_transport)
        digest = params.get("meshd_prompt_digest")
        return RemotePrefill(Peer(host, port), rid, tuple(blocks),
                             str(params.get("remote_engine_id") or ""), str(transport),
                             digest if isinstance(digest, str) else None)


def prompt_digest(prompt: tuple[int, ...]) -> str:
    """Short digest of the prompt's token ids: decode refuses KV computed for another prompt."""
    return hashlib.sha256(b"".join(t.to_bytes(4, "little") for t in prompt)).hexdigest()[:32]


def prefill_params(request_id: str, block_ids: tuple[int, ...], engine_id: str, peer: Peer,
                   transport: str, prompt: tuple[int, ...]) -> dict[str, Any]:
    """What a prefill response carries: vLLM's fields, plus `meshd_transport` and
    `meshd_prompt_digest` (the proxy passes the dict to decode unchanged)."""
    return {"do_remote_prefill": True, "do_remote_decode": False,
            "remote_engine_id": engine_id, "remote_block_ids": list(block_ids),
            "remote_request_id": request_id, "remote_host": peer.host,
            "remote_port": peer.port, "tp_size": 1, "meshd_transport": transport,
            "meshd_prompt_digest": prompt_digest(prompt)}


class Puller:
    """Decode side: pulls a prefill's blocks into import blocks. One per server."""

    def __init__(self, driver: AsyncEngine, auth: Authenticator, default_transport: str,
                 timeout_s: float, stats: DisaggStats) -> None:
        self._driver, self._auth = driver, auth
        self._default, self._timeout_s, self._stats = default_transport, timeout_s, stats
        self._clients: dict[str, TransportClient] = {}
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-pull")
        self._cleanups: set[asyncio.Future[bool]] = set()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for c in self._clients.values():
            c.close()

    def _client(self, name: str) -> TransportClient:
        if name not in self._clients:
            engine = self._driver.engine
            self._clients[name] = make_client(name, engine.kv_caches,
                                              block_layout(engine.layout), self._auth)
        return self._clients[name]

    async def pull(self, request_id: str, prompt: tuple[int, ...],
                   params: dict[str, Any]) -> bool:
        """True if the prompt's full blocks were imported under `request_id` (then add the
        request with `imported=True`); False: prefill locally (the reason is counted)."""
        remote = RemotePrefill.parse(params, self._default)
        if isinstance(remote, str):
            return self._fallback(remote)
        if remote.prompt_digest is not None and remote.prompt_digest != prompt_digest(prompt):
            return self._fallback("prompt_mismatch")
        n = (len(prompt) - 1) // self._driver.engine.config.block_size
        if n == 0:
            return False  # nothing to import: the last token is always computed here
        if len(remote.block_ids) < n:
            return self._fallback("bad_params")
        try:
            client = self._client(remote.transport)
        except ValueError:
            return self._fallback("unknown_transport")
        alloc = asyncio.ensure_future(
            self._driver.call(lambda e: e.allocate_for_import(request_id, prompt)))
        try:
            local = await self._shielded(alloc, request_id)
        except NoFreeBlocksError:
            return self._fallback("no_free_blocks")
        fetch = asyncio.get_running_loop().run_in_executor(
            self._pool, client.fetch, remote.peer, remote.request_id, remote.block_ids[:n],
            local, self._timeout_s)
        result = await self._shielded(fetch, request_id)
        with self._stats.lock:
            self._stats.pulled_bytes += result.bytes
            self._stats.pull_seconds += result.seconds
            self._stats.pulls_ok += result.ok
        if result.ok:
            return True
        code = result.error.code.value if result.error else "internal"
        log.warning("pull of %s from %s failed (%s); prefilling locally",
                    remote.request_id, remote.peer, result.error)
        self._stats.count(self._stats.pull_failures, code)
        await self._driver.call(lambda e: e.free_import(request_id))
        return self._fallback(code)

    async def _shielded(self, fut: asyncio.Future[T], request_id: str) -> T:
        """Await `fut`; if we are cancelled (client gone), free the import blocks once `fut`
        has finished, since its thread may still be writing them."""
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            def cleanup(_: object) -> None:
                task = asyncio.ensure_future(
                    self._driver.call(lambda e: e.free_import(request_id)))
                self._cleanups.add(task)
                task.add_done_callback(self._cleanups.discard)

            fut.add_done_callback(cleanup)
            raise

    def _fallback(self, reason: str) -> bool:
        self._stats.count(self._stats.fallbacks, reason)
        return False
