"""`ProxyHandler`: the default handler — round-robin over static workers, body passed through.

Non-streaming: the worker's status and body go to the client unchanged. Streaming: each worker
SSE payload is re-framed to the client as it arrives; a worker error before the first event is
returned with the worker's status and body. The lifecycle replaces this with prefill/decode;
`to_api_error` is the mapping it can reuse for backend failures.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from meshd.coordinator.gateway.http import errors
from meshd.coordinator.gateway.http.api_request import ApiRequest
from meshd.coordinator.gateway.http.errors import ApiError
from meshd.coordinator.gateway.http.responder import Responder
from meshd.coordinator.gateway.workers.client import (
    BackendConnectError,
    BackendError,
    BackendHTTPError,
    BackendPool,
    BackendTimeout,
)


def to_api_error(e: BackendError) -> ApiError:
    """Client-facing error for a failed worker exchange (the worker's own message for HTTP
    errors is kept when it is OpenAI-shaped; see ProxyHandler for pass-through)."""
    if isinstance(e, BackendTimeout):
        return errors.gateway_timeout(f"Worker {e.backend} timed out.")
    if isinstance(e, BackendConnectError):
        return errors.unavailable(f"Worker {e.backend} is unreachable.")
    if isinstance(e, BackendHTTPError):
        return ApiError(502 if e.status < 500 else e.status,
                        f"Worker {e.backend} answered HTTP {e.status}.",
                        err_type="server_error", code="worker_error")
    return errors.bad_gateway(f"Worker {e.backend} failed: {e}")


class ProxyHandler:
    """Implements `Handler`. `models` is what GET /v1/models lists."""

    def __init__(self, pools: Sequence[BackendPool], models: Sequence[str] = ()) -> None:
        if not pools:
            raise ValueError("pools: at least one backend is needed")
        self.pools = list(pools)
        self._models = tuple(models)
        self._next = itertools.cycle(self.pools).__next__

    def models(self) -> Sequence[str]:
        return self._models

    async def handle(self, req: ApiRequest, responder: Responder) -> None:
        pool = self._next()
        hdrs = (("x-request-id", req.request_id),)
        path = req.endpoint.value
        try:
            if not req.body.stream:
                r = await pool.request("POST", path, req.raw, headers=hdrs)
                responder.send(r.status, r.body)
                return
            async with pool.stream(path, req.raw, headers=hdrs) as events:
                await responder.start_stream()
                while batch := await events.next_batch():
                    await responder.send_events(batch)
                await responder.end_stream()
        except BackendHTTPError as e:
            if responder.started:
                raise to_api_error(e) from None
            responder.send(e.status, e.body)
        except BackendError as e:
            raise to_api_error(e) from None

    async def close(self) -> None:
        for p in self.pools:
            await p.close()
