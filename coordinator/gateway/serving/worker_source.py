"""`WorkerSource`: everything a choice run needs from the workers, and the live one.

The choice run (`choice.py`) decides nothing about sockets: it asks a source for the worker
views to route on, sends a prefill and opens a decode stream by worker id, and reports a
worker a request failed on. `PoolSource` is the live source over `workers.pool.WorkerPool`
(vLLM's protocol: `POST /v1/completions`); tests give a scripted one, so the failure logic is
tested table-driven in milliseconds beside the real-process fault tests.

Contract: `prefill` returns the worker's parsed JSON answer or raises a `BackendError`
subclass (`workers.client`); `stream` is an async context manager whose iteration yields each
SSE `data:` payload and raises a `BackendError` on failure. Cancellation anywhere aborts the
worker connection, so the worker sees the client go away and frees the request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from meshd.coordinator.gateway.workers.pool import WorkerPool
from meshd.scheduler.types import WorkerView

PATH = "/v1/completions"


class WorkerSource(Protocol):
    def views(self) -> Sequence[WorkerView]:
        """The workers to route on now (the same objects while nothing changed)."""
        ...

    def mark_failed(self, worker_id: str) -> None:
        """A request failed on this worker: keep it out of routing for a while."""
        ...

    async def prefill(self, worker_id: str, body: dict[str, Any], request_id: str,
                      timeout_s: float) -> Any:
        """The worker's JSON answer to a non-streamed completion."""
        ...

    def stream(self, worker_id: str, body: dict[str, Any], request_id: str,
               timeout_s: float) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
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
                      timeout_s: float) -> Any:
        r = await self.pool.pool(worker_id).post_json(
            PATH, body, headers=(("x-request-id", request_id),), timeout=timeout_s)
        return r.data

    def stream(self, worker_id: str, body: dict[str, Any], request_id: str,
               timeout_s: float) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self.pool.pool(worker_id).stream(PATH, body,
                                                headers=(("x-request-id", request_id),),
                                                timeout=timeout_s)
