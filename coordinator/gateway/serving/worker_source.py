"""`WorkerSource`: everything a choice run needs from the workers, and the live one.

The choice run (`choice.py`) decides nothing about sockets: it asks a source for the worker
views to route on, sends a prefill and opens a decode stream by worker id, and reports a
worker a request failed on. `PoolSource` is the live source over `workers.pool.WorkerPool`
(vLLM's protocol: `POST /v1/completions`); tests give a scripted one, so the failure logic is
tested table-driven in milliseconds beside the real-process fault tests.

`queued_tokens` is the prompt work the call puts on the worker (what it must prefill: the
prompt minus the prefix it caches; 0 for a decode that pulls its KV): the live source counts it
as queued on that worker until the prefill answer or the first event comes back, so the load
the router sees includes prefills this replica just sent (vLLM exports no such figure).

Contract: `prefill` returns the worker's parsed JSON answer or raises a `BackendError`
subclass (`workers.client`); `stream` is an async context manager giving `EventBatches`: each
`next_batch()` returns the SSE `data:` payloads that arrived (at least one; `[]` at the end of
the stream) and raises a `BackendError` on failure. Cancellation anywhere aborts the
worker connection, so the worker sees the client go away and frees the request.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Protocol

from meshd.coordinator.gateway.workers.client import SseStream
from meshd.coordinator.gateway.workers.pool import QUEUED_RESOLUTION, WorkerPool
from meshd.scheduler.types import WorkerView

PATH = "/v1/completions"
# Prefills shorter than this are not counted as queued: the router's load figures are
# accurate to QUEUED_RESOLUTION tokens anyway, and request counts cover many short ones.
LEDGER_MIN_TOKENS = QUEUED_RESOLUTION // 4


class EventBatches(Protocol):
    async def next_batch(self) -> list[bytes]:
        """The payloads that have arrived (waiting for one if none has); [] at the end."""
        ...


class WorkerSource(Protocol):
    def views(self) -> Sequence[WorkerView]:
        """The workers to route on now (the same objects while nothing changed)."""
        ...

    def mark_failed(self, worker_id: str) -> None:
        """A request failed on this worker: keep it out of routing for a while."""
        ...

    async def prefill(self, worker_id: str, body: dict[str, Any], request_id: str,
                      timeout_s: float, queued_tokens: int = 0, traceparent: str = "") -> Any:
        """The worker's JSON answer to a non-streamed completion. `traceparent`: the call's
        W3C trace context header ("": none)."""
        ...

    def stream(self, worker_id: str, body: dict[str, Any], request_id: str,
               timeout_s: float, queued_tokens: int = 0, traceparent: str = ""
               ) -> AbstractAsyncContextManager[EventBatches]:
        """A streamed completion; `timeout_s` bounds the headers and each gap between events."""
        ...


class PoolSource:
    """The live `WorkerSource`: the replica's worker pool over HTTP."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def views(self) -> Sequence[WorkerView]:
        return self.pool.views()

    def mark_failed(self, worker_id: str) -> None:
        self.pool.mark_failed(worker_id)

    async def prefill(self, worker_id: str, body: dict[str, Any], request_id: str,
                      timeout_s: float, queued_tokens: int = 0, traceparent: str = "") -> Any:
        pool = self.pool
        handle = (pool.prefill_started(worker_id, queued_tokens)
                  if queued_tokens >= LEDGER_MIN_TOKENS else 0)
        try:
            r = await pool.pool(worker_id).post_json(
                PATH, body, headers=_headers(request_id, traceparent), timeout=timeout_s)
        finally:
            if handle:
                pool.prefill_done(handle)
        return r.data

    def stream(self, worker_id: str, body: dict[str, Any], request_id: str,
               timeout_s: float, queued_tokens: int = 0, traceparent: str = ""
               ) -> AbstractAsyncContextManager[EventBatches]:
        stream = self.pool.pool(worker_id).stream(PATH, body,
                                                  headers=_headers(request_id, traceparent),
                                                  timeout=timeout_s)
        if queued_tokens < LEDGER_MIN_TOKENS:
            return stream
        return _Queued(stream, self.pool, worker_id, queued_tokens)


def _headers(request_id: str, traceparent: str) -> tuple[tuple[str, str], ...]:
    if traceparent:
        return (("x-request-id", request_id), ("traceparent", traceparent))
    return (("x-request-id", request_id),)


class _Queued:
    """A decode stream whose worker prefills first: its prompt counts as queued there until
    the first event (or the end of the stream, whichever comes first)."""

    def __init__(self, stream: SseStream, pool: WorkerPool, worker_id: str, tokens: int
                 ) -> None:
        self.stream, self.pool = stream, pool
        self.handle = pool.prefill_started(worker_id, tokens)

    async def __aenter__(self) -> _Queued:
        try:
            await self.stream.__aenter__()
        except BaseException:
            self._done()
            raise
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._done()
        await self.stream.__aexit__(et, e, tb)

    async def next_batch(self) -> list[bytes]:
        batch = await self.stream.next_batch()
        self._done()
        return batch

    def _done(self) -> None:
        if self.handle:
            self.pool.prefill_done(self.handle)
            self.handle = 0
