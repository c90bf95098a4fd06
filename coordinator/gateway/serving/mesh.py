"""`MeshHandler`: the gateway's request handler for the mesh (disaggregated serving).

Per request: tokenize and hash the prompt once (`PromptBuilder`), build the scheduler's
`RequestView`, run one `ChoiceRun` per choice (`n`), and answer in the client's shape
(`Shaper`): an SSE stream whose chunks are forwarded as workers produce tokens, or one body.
Requests with `tools` or `response_format` need the engine's chat endpoint, so they are passed
through to one worker (with failover before the first byte) instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from meshd.coordinator.gateway.config import Deadlines
from meshd.coordinator.gateway.http import errors
from meshd.coordinator.gateway.http.api_request import ApiRequest
from meshd.coordinator.gateway.http.errors import ApiError
from meshd.coordinator.gateway.http.openai_api import ChatRequest
from meshd.coordinator.gateway.http.responder import Responder
from meshd.coordinator.gateway.serving.choice import ChoiceRun, Counters
from meshd.coordinator.gateway.serving.lifecycle import Lifecycle
from meshd.coordinator.gateway.serving.prompts import PromptBuilder
from meshd.coordinator.gateway.serving.request_metrics import MeshMetrics
from meshd.coordinator.gateway.serving.shapes import ChoiceOutput, Delta, Shaper, usage
from meshd.coordinator.gateway.workers.client import BackendError, BackendHTTPError
from meshd.coordinator.gateway.workers.pool import WorkerPool
from meshd.scheduler.router import Router
from meshd.scheduler.types import RequestView

# Client fields the gateway owns: never forwarded from the client's body to a worker.
_RESERVED = frozenset({"kv_transfer_params", "return_token_ids", "prompt", "messages",
                       "stream", "stream_options", "n", "max_tokens", "max_completion_tokens",
                       "logprobs", "top_logprobs", "echo", "model"})


class MeshHandler:
    def __init__(self, pool: WorkerPool, router: Router, prompts: PromptBuilder,
                 deadlines: Deadlines | None = None, metrics: MeshMetrics | None = None,
                 clock: Any = time.monotonic, max_inflight: int = 1024) -> None:
        self.max_inflight = max_inflight
        self.inflight = 0
        self.pool = pool
        self.router = router
        self.prompts = prompts
        self.deadlines = deadlines or Deadlines()
        self.metrics = metrics or MeshMetrics()
        self.counters = Counters()
        self.clock = clock
        # Told of each request's finished choices (cache health); must be cheap.
        self.on_runs: Callable[[Sequence[ChoiceRun]], None] | None = None

    def models(self) -> Sequence[str]:
        return self.pool.models()

    def _worker_body(self, req: ApiRequest, index: int) -> dict[str, Any]:
        body = req.body
        s = body.sampling
        out: dict[str, Any] = {k: v for k, v in body.extra.items() if k not in _RESERVED}
        out["model"] = body.model
        if s.temperature is not None:
            out["temperature"] = s.temperature
        if s.top_p is not None:
            out["top_p"] = s.top_p
        if s.stop:
            out["stop"] = list(s.stop)
        if s.seed is not None:
            out["seed"] = s.seed + index  # n > 1: distinct, reproducible samples per choice
        if isinstance(body, ChatRequest):
            if body.logprobs:
                out["logprobs"] = body.top_logprobs or 0
        elif body.logprobs is not None:
            out["logprobs"] = body.logprobs
        if body.user:
            out["user"] = body.user
        return out

    async def handle(self, req: ApiRequest, responder: Responder) -> None:
        if self.inflight >= self.max_inflight:
            raise errors.rate_limited(f"This gateway replica is at its limit of "
                                      f"{self.max_inflight} requests in flight; retry shortly.",
                                      retry_after=1.0)
        self.inflight += 1
        try:
            await self._handle(req, responder)
        finally:
            self.inflight -= 1

    async def _handle(self, req: ApiRequest, responder: Responder) -> None:
        body = req.body
        if self.pool.passthrough(body.model) or (
                isinstance(body, ChatRequest) and (body.tools or body.response_format)):
            await self._passthrough(req, responder)
            return
        block_size = self.pool.block_size(body.model)
        if block_size is None:
            raise ApiError(404, f"The model {body.model!r} does not exist.", param="model",
                           code="model_not_found")
        prompt = self.prompts.build(req, block_size)
        view = RequestView(request_id=req.request_id, model=body.model,
                           num_prompt_tokens=len(prompt.token_ids),
                           block_hashes=prompt.block_hashes,
                           max_tokens=body.sampling.max_tokens or 16)
        shaper = Shaper(req)
        start = self.clock()
        runs = [ChoiceRun(self.pool, self.router, Lifecycle(f"{req.request_id}/{i}", start,
                                                            self.deadlines),
                          view, self._worker_body(req, i), prompt.token_ids,
                          body.sampling.max_tokens, req.request_id, self.counters, self.clock,
                          self.prompts.tokenizer(body.model).decode)
                for i in range(body.sampling.n)]
        timing = self.metrics.request(start)
        try:
            if body.stream:
                await self._stream(runs, shaper, responder, req, timing,
                                   len(prompt.token_ids))
            else:
                outputs = await self._gather(runs, timing)
                responder.send(200, shaper.body(outputs, usage(len(prompt.token_ids), outputs)))
            timing.done("ok")
        except ApiError as e:
            timing.done("timeout" if e.status == 504 else "error")
            raise
        except BaseException:
            timing.done("cancelled")
            raise
        finally:
            self.metrics.observe_runs(runs)
            if self.on_runs is not None:
                self.on_runs(runs)

    async def _gather(self, runs: list[ChoiceRun], timing: Any) -> list[ChoiceOutput]:
        async def one(run: ChoiceRun) -> ChoiceOutput:
            async def emit(d: Delta) -> None:
                timing.token(d)
            return await run.run(emit)

        return list(await asyncio.gather(*(one(r) for r in runs)))

    async def _stream(self, runs: list[ChoiceRun], shaper: Shaper, responder: Responder,
                      req: ApiRequest, timing: Any, prompt_tokens: int) -> None:
        async def one(i: int, run: ChoiceRun) -> ChoiceOutput:
            async def emit(d: Delta) -> None:
                timing.token(d)
                if not responder.started:
                    await responder.start_stream()
                await responder.send_event(shaper.chunk(i, d))
            return await run.run(emit)

        outputs = list(await asyncio.gather(*(one(i, r) for i, r in enumerate(runs))))
        if not responder.started:
            await responder.start_stream()
        if req.body.include_usage:
            await responder.send_event(shaper.usage_chunk(usage(prompt_tokens, outputs)))
        await responder.end_stream()

    async def _passthrough(self, req: ApiRequest, responder: Responder) -> None:
        """Chat with tools / response_format: the worker's chat endpoint does the work."""
        tried: set[str] = set()
        last: ApiError = errors.unavailable(f"No healthy worker serves {req.body.model!r}.")
        for v in self.pool.views():
            if not v.healthy or v.model != req.body.model or v.worker_id in tried:
                continue
            tried.add(v.worker_id)
            pool = self.pool.pool(v.worker_id)
            hdrs = (("x-request-id", req.request_id),)
            try:
                if not req.body.stream:
                    r = await pool.request("POST", req.endpoint.value, req.raw, headers=hdrs,
                                           timeout=self.deadlines.total_s)
                    responder.send(r.status, r.body)
                    return
                async with pool.stream(req.endpoint.value, req.raw, headers=hdrs,
                                       timeout=self.deadlines.first_token_s) as events:
                    await responder.start_stream()
                    while batch := await events.next_batch():
                        await responder.send_events(batch)
                    await responder.end_stream()
                    return
            except BackendHTTPError as e:
                if e.status < 500 and not responder.started:
                    responder.send(e.status, e.body)
                    return
                last = errors.bad_gateway(str(e))
            except BackendError as e:
                last = errors.unavailable(str(e))
            if responder.started:
                raise last
            self.pool.mark_failed(v.worker_id)
        raise last
