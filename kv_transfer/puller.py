"""The decode side's pull, one for the embedded engine (`node_agent/engine/disagg.py`) and meshd's
vLLM connector (`vllm_connector.py`).

`KVPuller` owns what both need: one `TransportClient` per transport, built on first use (one
that cannot be built here is remembered as `Unavailable` and not retried per request), a small
thread pool, and the mapping of everything that can go wrong to a typed `PullOutcome`. The
callers keep what differs: the engine allocates and frees import blocks and counts
`DisaggStats`; the connector reports to its receive bookkeeping (`vllm_params.RecvResults`).

A pull's `reason` is `None` (it worked), a transfer's `ErrorCode`, or a `PullFailure` (decided
here, never on the wire). Their values are metric label values: keep them stable.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple, TypeAlias

from meshd.kv_transfer.transport import (
    ErrorCode,
    KVViews,
    Peer,
    TransferResult,
    TransportClient,
    make_client,
)

if TYPE_CHECKING:
    from meshd.kv_transfer.auth import Authenticator

PULL_THREADS = 4
# What building a client raises when the transport cannot run here: a missing module (cupy),
# tensors on the wrong device, no CUDA, no /dev/shm.
BUILD_ERRORS = (ValueError, RuntimeError, ImportError, OSError)


class PullFailure(StrEnum):
    """Why a pull did not run, decided on the decode side."""

    TRANSPORT_UNAVAILABLE = "transport_unavailable"  # the transport cannot be built here
    NO_PLAN = "no_plan"  # nothing to pull: the remote -> local block map could not be made


PullReason: TypeAlias = ErrorCode | PullFailure


class Unavailable(NamedTuple):
    """A transport that cannot run here, and why (the build error's message)."""

    transport: str
    message: str


NOTHING_MOVED = TransferResult(False, 0, 0.0)


class PullOutcome(NamedTuple):
    """One pull. `reason`: None on success, else the transfer's `ErrorCode` or a `PullFailure`.
    `result`: the transport's (`NOTHING_MOVED` when no fetch ran); `via`: the client's wire
    name (e.g. `tcp+vllm-BHNC`; "" when none was built); `detail`: a message for logs."""

    reason: PullReason | None
    result: TransferResult
    via: str = ""
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is None

    def describe(self) -> str:
        """`ok`, or `<reason>: <detail>` (what the callers log)."""
        return "ok" if self.reason is None else f"{self.reason.value}: {self.detail}"

    @staticmethod
    def failed(reason: PullReason, detail: str) -> PullOutcome:
        return PullOutcome(reason, NOTHING_MOVED, "", detail)

    @staticmethod
    def of(result: TransferResult, via: str) -> PullOutcome:
        """The outcome of a fetch that returned `result` (a result without an error that is not
        ok counts as `internal`)."""
        if result.ok:
            return PullOutcome(None, result, via)
        if result.error is None:
            return PullOutcome(ErrorCode.INTERNAL, result, via, "failed without an error")
        return PullOutcome(result.error.code, result, via, result.error.message)


class KVPuller:
    """Pulls remote blocks into local blocks of `views`, each fetch bounded by `timeout_s`.

    Thread-safe: `client` and `fetch` may run on any thread (`fetch` blocks it; never call it on
    an asyncio loop); `submit` runs `fetch` on the puller's own pool of `threads`. Building a
    client holds the puller's lock (an NCCL client may take a while), so concurrent first uses
    of a transport build it once. `close` stops the pool (pending pulls are cancelled) and
    closes the clients; a fetch still running finishes on its own deadline.
    """

    def __init__(self, views: KVViews, auth: Authenticator, timeout_s: float, *,
                 threads: int = PULL_THREADS, log: logging.Logger | None = None) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: must be > 0, got {timeout_s}")
        self._views, self._auth, self.timeout_s = views, auth, timeout_s
        self._log = log or logging.getLogger(__name__)
        self._clients: dict[str, TransportClient | Unavailable] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="meshd-kv-pull")

    def client(self, transport: str) -> TransportClient | Unavailable:
        """The client for `transport` (built on first use), or why it cannot run here."""
        with self._lock:
            if self._closed:
                return Unavailable(transport, "the puller is closed")
            client = self._clients.get(transport)
            if client is None:
                v = self._views
                try:
                    client = make_client(transport, v.tensors, v.layout, self._auth,
                                         views=v.kind)
                except BUILD_ERRORS as exc:
                    self._log.warning("kv transfer: cannot pull over %s here: %s", transport,
                                      exc)
                    client = Unavailable(transport, str(exc))
                self._clients[transport] = client
            return client

    def fetch(self, transport: str, peer: Peer, remote_request_id: str,
              remote_block_ids: Sequence[int], local_block_ids: Sequence[int]) -> PullOutcome:
        """Copy the remote blocks (in order) into the local ones (same order, same count) over
        `transport`. Never raises: a caller bug (bad arguments) is logged and `internal`."""
        client = self.client(transport)
        if isinstance(client, Unavailable):
            return PullOutcome.failed(PullFailure.TRANSPORT_UNAVAILABLE,
                                      f"{transport}: {client.message}")
        try:
            result = client.fetch(peer, remote_request_id, remote_block_ids, local_block_ids,
                                  self.timeout_s)
        except Exception as exc:  # a caller bug must not strand the request
            self._log.exception("kv transfer: pull of %s from %s:%d failed", remote_request_id,
                                peer.host, peer.port)
            return PullOutcome(ErrorCode.INTERNAL, NOTHING_MOVED, client.name, str(exc))
        return PullOutcome.of(result, client.name)

    def submit(self, transport: str, peer: Peer, remote_request_id: str,
               remote_block_ids: Sequence[int], local_block_ids: Sequence[int]
               ) -> Future[PullOutcome]:
        """`fetch` on the pool. The future is cancelled if `close` runs before it starts."""
        return self._pool.submit(self.fetch, transport, peer, remote_request_id,
                                 tuple(remote_block_ids), tuple(local_block_ids))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._closed = True
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            if not isinstance(c, Unavailable):
                c.close()
