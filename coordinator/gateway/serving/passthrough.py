"""Requests the mesh path does not drive: the client's body goes to one worker as it is.

Two cases: a model served only by plain OpenAI-compatible workers (engine "openai"), which
take text prompts and know nothing of P/D; and chat with `response_format`, which needs the
worker's own constrained decoding (chat with `tools` takes the mesh path: docs/api.md). A
worker that fails before the first byte is marked failed and the next one that serves the
model is tried; after the first byte a failure ends
the stream with an error event (a pass-through response cannot be continued elsewhere).
"""

from __future__ import annotations

from meshd.coordinator.gateway.config import Deadlines
from meshd.coordinator.gateway.http import errors
from meshd.coordinator.gateway.http.api_request import ApiRequest
from meshd.coordinator.gateway.http.errors import ApiError
from meshd.coordinator.gateway.http.responder import Responder
from meshd.coordinator.gateway.serving import failures
from meshd.coordinator.gateway.workers.client import BackendError, BackendHTTPError
from meshd.coordinator.gateway.workers.pool import WorkerPool
from meshd.scheduler.privacy import node_class


async def passthrough(pool: WorkerPool, deadlines: Deadlines, req: ApiRequest,
                      responder: Responder, classes: frozenset[str] | None = None) -> None:
    """Answer `req` from the first worker serving its model that answers (on a node of one of
    `classes`, when privacy routing restricts it)."""
    last: ApiError = errors.unavailable(f"No healthy worker serves {req.body.model!r}.")
    hdrs = (("x-request-id", req.request_id),)
    path = req.endpoint.value
    for wid in pool.passthrough_workers(req.body.model):
        if classes is not None and node_class(pool.entries[wid].member.attributes) not in classes:
            continue
        client = pool.pool(wid)
        try:
            if not req.body.stream:
                r = await client.request("POST", path, req.raw, headers=hdrs,
                                         timeout=deadlines.total_s)
                responder.send(r.status, r.body)
                return
            async with client.stream(path, req.raw, headers=hdrs,
                                     timeout=deadlines.first_token_s) as events:
                await responder.start_stream()
                while batch := await events.next_batch():
                    await responder.send_events(batch)
                await responder.end_stream()
                return
        except BackendHTTPError as e:
            if e.status < 500 and not responder.started:
                responder.send(e.status, e.body)
                return
            last = failures.passthrough_error(e)
        except BackendError as e:
            last = failures.passthrough_error(e)
        if responder.started:
            raise last
        pool.mark_failed(wid)
    raise last
