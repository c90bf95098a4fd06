"""Drives one choice of one request through the lifecycle (see `coordinator.lifecycle`).

    decide ─▶ [remote prefill on P] ─▶ decode on D (pulls P's KV, streams tokens)
                   │ fails: another P, else local              │ dies mid-stream:
                   ▼                                           ▼
              decode with local prefill          continue on another worker with
                                                 prompt + tokens so far (no gap, no duplicate)

Every step has a deadline (`Deadlines`), every failure a defined outcome, and the client is
never answered twice for a token: tokens are forwarded by id as they arrive, and a continuation
starts from exactly the ids already forwarded. Workers speak vLLM's protocol (`/v1/completions`
with `kv_transfer_params`), so vLLM workers and the embedded engine run the same path.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from meshd.coordinator.gateway.http.errors import ApiError
from meshd.coordinator.gateway.serving.lifecycle import Action, Failure, Lifecycle, Phase
from meshd.coordinator.gateway.serving.shapes import ChoiceOutput, Delta, SeamText, parse_delta
from meshd.coordinator.gateway.workers.client import (
    BackendConnectError,
    BackendError,
    BackendHTTPError,
    BackendProtocolError,
    BackendTimeout,
)
from meshd.coordinator.gateway.workers.pool import WorkerPool
from meshd.scheduler.router import Router
from meshd.scheduler.types import Decision, NoWorkerAvailable, RequestView

Emit = Callable[[Delta], Awaitable[None]]
PATH = "/v1/completions"
_NO_REMOTE = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
              "remote_block_ids": None, "remote_host": None, "remote_port": None}


class Counters:
    """What the lifecycle counts (the mesh's metrics read these)."""

    def __init__(self) -> None:
        self.disaggregated = 0
        self.local_prefill = 0
        self.prefill_retries = 0
        self.prefill_fallbacks = 0
        self.continuations = 0


def _failure(e: BackendError) -> Failure:
    if isinstance(e, BackendHTTPError):
        return Failure.BAD_REQUEST if 400 <= e.status < 500 else Failure.WORKER_ERROR
    if isinstance(e, BackendTimeout):
        return Failure.TIMEOUT
    if isinstance(e, BackendConnectError):
        return Failure.CONNECT
    return Failure.WORKER_ERROR


def _worker_error(e: BackendHTTPError) -> ApiError:
    """A worker's 4xx, passed to the client with the worker's own message when it has one."""
    try:
        err = orjson.loads(e.body)["error"]
        return ApiError(e.status, str(err.get("message")), param=err.get("param"),
                        err_type=str(err.get("type") or "invalid_request_error"),
                        code=err.get("code"))
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return ApiError(e.status, f"The worker rejected the request (HTTP {e.status}).")


class ChoiceRun:
    def __init__(self, pool: WorkerPool, router: Router, lc: Lifecycle, view: RequestView,
                 body: dict[str, Any], prompt: tuple[int, ...], max_tokens: int | None,
                 request_id: str, counters: Counters, clock: Callable[[], float],
                 decode_text: Callable[[list[int]], str] | None = None) -> None:
        """`decode_text` (the model's tokenizer) makes text seamless across a continuation."""
        self.pool = pool
        self.router = router
        self.lc = lc
        self.view = view
        self.body = body  # sampling fields for the worker; prompt/max_tokens/stream set here
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.request_id = request_id
        self.counters = counters
        self.clock = clock
        self.out = ChoiceOutput()
        self.excluded: set[str] = set()
        self.decode_text = decode_text
        self.seam: SeamText | None = None
        self.decision: Decision | None = None  # the first routing decision (cache health)

    # -- routing ----------------------------------------------------------------------------

    def _decide(self, view: RequestView | None = None) -> Decision:
        workers = [w for w in self.pool.views() if w.worker_id not in self.excluded]
        try:
            return self.router.decide(view or self.view, workers)
        except NoWorkerAvailable:
            raise ApiError(503, f"No healthy worker can serve model {self.view.model!r}.",
                           err_type="server_error", code="no_worker") from None

    def _failed(self, worker_id: str, failure: Failure, detail: str) -> Action:
        self.pool.mark_failed(worker_id)
        self.excluded.add(worker_id)
        self.lc.fail(failure, f"{worker_id}: {detail}")
        return self.lc.recovery(failure, self.clock())

    def _give_up(self, failure: Failure, detail: str) -> ApiError:
        timed_out = failure in (Failure.TIMEOUT, Failure.DEADLINE) or self.lc.remaining(
            self.clock()) <= 0
        self.lc.finish_failed(self.clock(), "timeout" if timed_out else "worker_failed")
        if timed_out:
            return ApiError(504, f"The request did not complete within its deadline ({detail}).",
                            err_type="server_error", code="timeout")
        return ApiError(503, f"The request failed on every worker tried ({detail}).",
                        err_type="server_error", code="worker_failed")

    # -- the lifecycle ----------------------------------------------------------------------

    async def run(self, emit: Emit) -> ChoiceOutput:
        decision = self.decision = self._decide()
        params: dict[str, Any] | None = None
        if decision.disaggregated:
            params, decision = await self._prefill(decision)
        else:
            self.counters.local_prefill += 1
        await self._decode(decision.decode, params, emit)
        return self.out

    async def _prefill(self, decision: Decision) -> tuple[dict[str, Any] | None, Decision]:
        """Remote prefill with retries; returns (kv_transfer_params or None, decision)."""
        while True:
            self.lc.advance(Phase.PREFILL, self.clock(), decision.prefill)
            body = {**self.body, "prompt": list(self.prompt), "max_tokens": 1, "stream": False,
                    "kv_transfer_params": dict(_NO_REMOTE)}
            body.pop("stream_options", None)
            timeout = self.lc.step_timeout(self.clock(), self.lc.deadlines.prefill_s)
            try:
                resp = await self.pool.pool(decision.prefill).post_json(
                    PATH, body, headers=(("x-request-id", f"{self.request_id}-p"),),
                    timeout=max(timeout, 1e-3))
            except BackendError as e:
                failure = _failure(e)
                if isinstance(e, BackendHTTPError) and failure is Failure.BAD_REQUEST:
                    self.lc.finish_failed(self.clock(), "bad_request")
                    raise _worker_error(e) from None
                action = self._failed(decision.prefill, failure, str(e))
                if action is Action.GIVE_UP:
                    raise self._give_up(failure, str(e)) from None
                if action is Action.RETRY_PREFILL:
                    self.counters.prefill_retries += 1
                    decision = self._decide()
                    if decision.disaggregated:
                        continue
                self.counters.prefill_fallbacks += 1
                return None, decision
            self.counters.disaggregated += 1
            data = resp.data
            experts = (data.get("meshd") or {}).get("experts") if isinstance(data, dict) else None
            if experts and decision.decode not in self.excluded:
                expert_view = dataclasses.replace(self.view, experts={int(e): 1 for e in experts})
                decision = decision._replace(decode=self._decide(expert_view).decode)
            params = data.get("kv_transfer_params") if isinstance(data, dict) else None
            return (params if isinstance(params, dict) else None), decision

    async def _decode(self, worker_id: str, params: dict[str, Any] | None, emit: Emit) -> None:
        self.lc.advance(Phase.TRANSFER if params else Phase.DECODE, self.clock(), worker_id)
        while True:
            if self._remaining() == 0:  # everything was forwarded; only the finish was lost
                self.out.finish_reason = self.out.finish_reason or "length"
                break
            try:
                await self._stream(worker_id, params, emit)
            except (BackendError, TimeoutError) as e:
                if isinstance(e, TimeoutError):  # our own step deadline: a stall, or the end
                    failure = (Failure.DEADLINE if self.lc.remaining(self.clock()) <= 0
                               else Failure.TIMEOUT)
                    detail = f"{worker_id} stalled" if failure is Failure.TIMEOUT else "deadline"
                else:
                    failure, detail = _failure(e), str(e)
                if isinstance(e, BackendHTTPError) and failure is Failure.BAD_REQUEST:
                    self.lc.finish_failed(self.clock(), "bad_request")
                    raise _worker_error(e) from None
                if failure is Failure.DEADLINE:
                    raise self._give_up(failure, detail) from None
                action = self._failed(worker_id, failure, detail)
                if action is not Action.CONTINUE_DECODE:
                    raise self._give_up(failure, detail) from None
                self.counters.continuations += 1
                if self.decode_text is not None:
                    ids = self.out.token_ids
                    self.seam = SeamText(self.decode_text, SeamText.pending(
                        self.decode_text, ids, "".join(self.out.text)), self.body.get("stop", ()))
                worker_id = self._decide().decode
                params = None  # the new worker prefills prompt + tokens so far itself
                if self.lc.phase is Phase.TRANSFER:
                    self.lc.advance(Phase.DECODE, self.clock(), "transfer failed")
                self.lc.redecode(self.clock(), worker_id)
                continue
            if self.out.finish_reason is None and self._remaining() != 0:
                raise self._give_up(Failure.WORKER_ERROR, f"{worker_id} ended the stream early")
            break
        self.out.finish_reason = self.out.finish_reason or "length"
        self.lc.advance(Phase.DONE, self.clock())

    def _remaining(self) -> int | None:
        if self.max_tokens is None:
            return None
        return max(0, self.max_tokens - len(self.out.token_ids))

    async def _stream(self, worker_id: str, params: dict[str, Any] | None, emit: Emit) -> None:
        d = self.lc.deadlines
        body = {**self.body, "prompt": [*self.prompt, *self.out.token_ids], "stream": True,
                "stream_options": {"include_usage": True}, "return_token_ids": True}
        remaining = self._remaining()
        if remaining is not None:
            body["max_tokens"] = remaining
        if params:
            body["kv_transfer_params"] = params
        loop = asyncio.get_running_loop()
        first = self.lc.decode_attempts <= 1
        # One timer, moved after every chunk: first token within first_token_s, then each
        # next one within inter_token_s, never past the request's deadline.
        async with asyncio.timeout(None) as step:
            step.reschedule(loop.time() + self.lc.step_timeout(self.clock(), d.first_token_s))
            async with self.pool.pool(worker_id).stream(
                    PATH, body, headers=(("x-request-id", f"{self.request_id}-d"),),
                    timeout=d.first_token_s) as events:
                async for data in events:
                    try:
                        chunk = orjson.loads(data)
                    except orjson.JSONDecodeError:
                        raise BackendProtocolError("undecodable stream chunk", worker_id) from None
                    if "error" in chunk:  # vLLM reports mid-stream failures as an error event
                        raise BackendProtocolError(f"error event: {chunk['error']}", worker_id)
                    usage = chunk.get("usage")
                    if usage and first:
                        details = usage.get("prompt_tokens_details") or {}
                        self.out.cached_tokens = int(details.get("cached_tokens") or 0)
                    for raw in chunk.get("choices") or ():
                        await self._forward(parse_delta(raw), emit)
                    step.reschedule(loop.time() + self.lc.step_timeout(self.clock(),
                                                                       d.inter_token_s))

    async def _forward(self, delta: Delta, emit: Emit) -> None:
        if self.lc.phase is Phase.TRANSFER:
            self.lc.advance(Phase.DECODE, self.clock(), "first token")
        if not delta.token_ids and not delta.text and delta.finish_reason is None:
            return
        if self.seam is not None:
            delta.text = self.seam.feed(delta)
        self.out.token_ids.extend(delta.token_ids)
        if delta.text:
            self.out.text.append(delta.text)
        if delta.logprobs:
            self.out.logprobs.append(delta.logprobs)
        if delta.finish_reason is not None:
            self.out.finish_reason = delta.finish_reason
        await emit(delta)
