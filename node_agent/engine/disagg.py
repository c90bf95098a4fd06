"""The disaggregation contract (vLLM's NixlConnector proxy protocol) for the embedded engine.

Prefill side (`kv_transfer_params.do_remote_decode`): the request runs with
`hold_blocks_on_finish`; if it stopped by the length cap its blocks are put under a **lease**
keyed by the engine-internal request id (`remote_request_id`) in the shared
`kv_transfer.leases.LeaseTable`, which the kv_transfer server uses as its `BlockSource`;
`EngineLeases` ties lease ends to the engine's held blocks. The response's
`kv_transfer_params` come from the worker's `kv_transfer.offering.KVOffer.params`.

Decode side (`do_remote_prefill`): `Puller.pull` allocates import blocks, fetches them with the
shared `kv_transfer.puller.KVPuller` (a worker thread, a deadline, a typed outcome) and reports
whether the request may run with `imported=True`; on any failure the import blocks are freed
and the request is prefilled locally (counted by reason in `DisaggStats.fallbacks`). The client
gets the same tokens either way.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeAlias, TypeVar

from meshd.kv_transfer.auth import Authenticator
from meshd.kv_transfer.layout import BlockLayout
from meshd.kv_transfer.leases import LeaseStats, LeaseTable
from meshd.kv_transfer.params import ParamsError, RemotePrefill
from meshd.kv_transfer.puller import KVPuller, PullFailure, PullOutcome, PullReason, Unavailable
from meshd.kv_transfer.select import HostFacts, pull_transport
from meshd.kv_transfer.transport import ErrorCode, KVViews, available_transports
from meshd.node_agent.engine.api import KVLayout
from meshd.node_agent.engine.async_engine import AsyncEngine
from meshd.node_agent.engine.engine import Engine, NoFreeBlocksError

log = logging.getLogger(__name__)

T = TypeVar("T")


def block_layout(layout: KVLayout) -> BlockLayout:
    return BlockLayout(layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype,
                       layout.block_size)


@dataclass(slots=True)
class DisaggStats:
    """Counters for /metrics; mutated under `lock` from loop, transport and step threads."""

    pulled_bytes: int = 0
    pull_seconds: float = 0.0
    pulls_ok: int = 0
    pull_failures: dict[str, int] = field(default_factory=dict)  # by ErrorCode value
    fallbacks: dict[str, int] = field(default_factory=dict)  # local prefill, by reason
    pulls_by_transport: dict[str, int] = field(default_factory=dict)  # successful, by name
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, table: dict[str, int], key: str) -> None:
        with self.lock:
            table[key] = table.get(key, 0) + 1


class EngineLeases:
    """The engine's side of the shared `LeaseTable`, which holds all lease state (this class
    holds none). `table` is the kv_transfer server's `BlockSource`.

    A lease's end frees the engine's held blocks, on the thread that ended it:
    - `sent` (transport thread, `on_sent`): through `driver.run_locked`, after the table has
      dropped its own lock (lock order: engine, then table, never the reverse);
    - `expired` (`expire(engine)`: the step thread's housekeeping, engine lock held): with the
      engine it is given, never re-taking the lock;
    - `released` (`forget`: the driver's `on_aborted` hook): the abort already freed them.
    `grant` and `forget` run on the step thread with the engine lock held.
    """

    def __init__(self, driver: AsyncEngine, timeout_s: float, transfer_timeout_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 on_end: Callable[[str], None] | None = None) -> None:
        """`on_end(request_id)`: called once for every lease that ends, for any reason."""
        self._driver = driver
        self._on_end = on_end
        # lookup_wait_s=0: the step thread grants the lease before the response carrying the
        # params leaves, so a fetch never arrives ahead of its lease.
        self.table = LeaseTable(timeout_s, transfer_timeout_s=transfer_timeout_s,
                                lookup_wait_s=0.0, on_end=self._ended, clock=clock)

    def __len__(self) -> int:
        return len(self.table)

    def get(self, request_id: str) -> tuple[int, ...] | None:
        return self.table.get(request_id)

    def stats(self) -> LeaseStats:
        return self.table.stats()

    def grant(self, request_id: str, block_ids: tuple[int, ...]) -> None:
        self.table.grant(request_id, block_ids)

    def forget(self, request_id: str) -> None:
        self.table.release(request_id)

    def expire(self, engine: Engine) -> None:
        """Step-thread housekeeping (engine lock held): free the leases past their deadline."""
        for rid in self.table.expire():
            engine.release_held(rid)
            log.info("lease of %s expired; blocks freed", rid)

    def _ended(self, request_id: str, why: str) -> None:
        if why == "sent":  # other ends run where the engine is already in hand (see above)
            self._driver.run_locked(lambda e: e.release_held(request_id))
        if self._on_end is not None:
            self._on_end(request_id)


class Fallback(StrEnum):
    """The engine's own reasons to prefill a remote-prefill request locally (beside
    `ParamsError`, `PullFailure` and a failed transfer's `ErrorCode`). Metric label values."""

    PROMPT_MISMATCH = "prompt_mismatch"  # the params carry the digest of another prompt
    TOO_FEW_BLOCKS = "too_few_blocks"  # fewer remote blocks than the prompt's full blocks
    NO_FREE_BLOCKS = "no_free_blocks"  # no import blocks to pull into


FallbackReason: TypeAlias = ParamsError | Fallback | PullReason


class Puller:
    """Decode side: pulls a prefill's blocks into import blocks. One per server.

    The pull itself (clients per transport, the fetch pool and deadline, typed outcomes) is
    `kv_transfer.puller.KVPuller`, shared with the vLLM connector; this class adds the engine's
    part: the import blocks (allocated before the fetch, freed after a failure or a cancel) and
    `DisaggStats`."""

    def __init__(self, driver: AsyncEngine, auth: Authenticator, default_transport: str,
                 timeout_s: float, stats: DisaggStats, facts: HostFacts | None = None) -> None:
        self._driver = driver
        self._facts = facts or HostFacts(socket.gethostname())
        self._default, self._stats = default_transport, stats
        self._transports = frozenset(available_transports())
        engine = driver.engine
        self._kv = KVPuller(KVViews(engine.kv_caches, block_layout(engine.layout)), auth,
                            timeout_s, log=log)
        self._cleanups: set[asyncio.Future[bool]] = set()

    def close(self) -> None:
        self._kv.close()

    async def pull(self, request_id: str, prompt: tuple[int, ...],
                   params: dict[str, Any]) -> bool:
        """True if the prompt's full blocks were imported under `request_id` (then add the
        request with `imported=True`); False: prefill locally, the reason counted in
        `stats.fallbacks`: a `ParamsError` (`RemotePrefill.parse`), a `Fallback`,
        `transport_unavailable` (`PullFailure`: the transport cannot be built here), or a
        failed transfer's `ErrorCode` (also counted in `stats.pull_failures`)."""
        remote = RemotePrefill.parse(params, allowed_transports=self._transports,
                                     default_transport=self._default)
        if isinstance(remote, ParamsError):
            return self._fallback(remote)
        if not remote.matches(prompt):
            return self._fallback(Fallback.PROMPT_MISMATCH)
        n = (len(prompt) - 1) // self._driver.engine.config.block_size
        if n == 0:
            return False  # nothing to import: the last token is always computed here
        if len(remote.block_ids) < n:
            return self._fallback(Fallback.TOO_FEW_BLOCKS)
        transport = pull_transport(remote, self._facts, "cpu").name
        missing = self._kv.client(transport)
        if isinstance(missing, Unavailable):
            log.warning("transport %r unavailable (%s); prefilling locally", transport,
                        missing.message)
            return self._fallback(PullFailure.TRANSPORT_UNAVAILABLE)
        alloc = asyncio.ensure_future(
            self._driver.call(lambda e: e.allocate_for_import(request_id, prompt)))
        try:
            local = await self._shielded(alloc, request_id)
        except NoFreeBlocksError:
            return self._fallback(Fallback.NO_FREE_BLOCKS)
        fetch = asyncio.wrap_future(self._kv.submit(transport, remote.peer, remote.request_id,
                                                    remote.block_ids[:n], local))
        out = await self._shielded(fetch, request_id)
        return await self._settle(request_id, transport, remote, out)

    async def _settle(self, request_id: str, transport: str, remote: RemotePrefill,
                      out: PullOutcome) -> bool:
        """Count a finished pull; after a failure free the import blocks (fall back)."""
        result = out.result
        with self._stats.lock:
            self._stats.pulled_bytes += result.bytes
            self._stats.pull_seconds += result.seconds
            self._stats.pulls_ok += out.ok
        if out.reason is None:
            self._stats.count(self._stats.pulls_by_transport, transport)
            return True
        log.warning("pull of %s from %s failed (%s); prefilling locally",
                    remote.request_id, remote.peer, out.describe())
        if isinstance(out.reason, ErrorCode):
            self._stats.count(self._stats.pull_failures, out.reason.value)
        await self._driver.call(lambda e: e.free_import(request_id))
        return self._fallback(out.reason)

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

    def _fallback(self, reason: FallbackReason) -> bool:
        self._stats.count(self._stats.fallbacks, reason.value)
        return False
