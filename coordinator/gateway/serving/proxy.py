"""`ProxyHandler`: the default handler — round-robin over static workers, body passed through.

Non-streaming: the worker's status and body go to the client unchanged. Streaming: each worker
SSE payload is re-framed to the client as it arrives; a worker error before the first event is
returned with the worker's status and body; other failures map through
`failures.passthrough_error`. The mesh handler replaces this with prefill/decode.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from meshd.coordinator.gateway.http.api_request import ApiRequest
from meshd.coordinator.gateway.http.responder import Responder
from meshd.coordinator.gateway.serving import failures
from meshd.coordinator.gateway.workers.client import (
    BackendError,
    BackendHTTPError,
    BackendPool,
)


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
                raise failures.passthrough_error(e) from None
            responder.send(e.status, e.body)
        except BackendError as e:
            raise failures.passthrough_error(e) from None

    async def close(self) -> None:
        for p in self.pools:
            await p.close()
