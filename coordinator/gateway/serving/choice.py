"""Drives one choice of one request through the lifecycle (see `lifecycle.py`).

    decide ─▶ [remote prefill on P] ─▶ decode on D (pulls P's KV, streams tokens)
                   │ fails: another P, else local              │ dies mid-stream:
                   ▼                                           ▼
              decode with local prefill          continue on any live worker with
                                                 prompt + tokens so far (no gap, no duplicate)

Every step has a deadline (`Deadlines`), every failure a defined outcome (`failures.py`), and
the client is never answered twice for a token: tokens are forwarded by id as they arrive, and
a continuation starts from exactly the ids already forwarded. Roles are preferences: when no
decode worker is left, the continuation (and a fresh request) runs on any live worker that
serves the model, and P/D resumes once a decode worker is back. Workers speak vLLM's protocol
(through a `WorkerSource`), so vLLM workers and the embedded engine run the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from meshd.coordinator.gateway.config import Deadlines
from meshd.coordinator.gateway.http.errors import ApiError
from meshd.coordinator.gateway.serving import failures
from meshd.coordinator.gateway.serving.confidence import HALTED, ConfidenceMeter
from meshd.coordinator.gateway.serving.lifecycle import Action, Failure, Lifecycle, Phase
from meshd.coordinator.gateway.serving.receipts import Provenance, Segment, attestation_of
from meshd.coordinator.gateway.serving.shapes import ChoiceOutput, Delta, SeamText, parse_delta
from meshd.coordinator.gateway.serving.step_timer import StepTimer
from meshd.coordinator.gateway.serving.worker_source import WorkerSource
from meshd.coordinator.gateway.tracing.context import TraceContext
from meshd.coordinator.gateway.tracing.trace import Call
from meshd.coordinator.gateway.workers.client import (
    BackendError,
    BackendHTTPError,
    BackendProtocolError,
)
from meshd.scheduler.privacy import node_class
from meshd.scheduler.router import Router
from meshd.scheduler.types import Decision, NoWorkerAvailable, RequestView, WorkerView

# Told of the deltas each worker read burst produced (one call per burst, not per token).
Emit = Callable[[list[Delta]], Awaitable[None]]
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


@dataclass(frozen=True, slots=True)
class ChoiceSpec:
    """One choice of one request, as the run needs it. `body` holds the sampling fields for
    the workers (the run sets prompt, max_tokens, stream and kv_transfer_params itself);
    `decode_text` (the model's tokenizer) makes text seamless across a continuation."""

    request_id: str
    index: int
    view: RequestView
    prompt: tuple[int, ...]
    body: Mapping[str, Any]
    max_tokens: int | None
    stops: tuple[str, ...] = ()
    decode_text: Callable[[list[int]], str] | None = None
    # privacy routing: the node classes every worker of this choice must be on (None: any)
    classes: frozenset[str] | None = None
    # confidence scoring (its own per choice), and whether the client asked for the logprobs
    # (else they were asked for the meter only and are not forwarded)
    meter: ConfidenceMeter | None = None
    client_logprobs: bool = True
    # receipts: worker id -> (node id, attests?); set, the run records where its tokens came
    # from (`segments`, `prefilled_on`) and asks the workers that can to attest them
    provenance: Provenance | None = None
    # confidence: does a worker score its own tokens? Then a meter-only request asks it for
    # `meshd_confidence` (one float per token) instead of top-k logprobs
    scores_itself: Callable[[str], bool] | None = None
    # tracing: the request's trace context; set, each worker call gets its own span id (in
    # its `traceparent`) and is recorded in `calls`
    trace: TraceContext | None = None
    # constrained decoding (`body` holds a response_format): which workers enforce it. Only
    # they run the choice, and one that fails after tokens were produced is not continued on
    # another: the grammar's state is on the worker that failed
    constrains: Callable[[str], bool] | None = None


class ChoiceRun:
    def __init__(self, spec: ChoiceSpec, source: WorkerSource, router: Router,
                 deadlines: Deadlines, counters: Counters, clock: Callable[[], float],
                 start: float | None = None, loop: asyncio.AbstractEventLoop | None = None
                 ) -> None:
        """`loop`: the running loop when the caller has it at hand (on CPython 3.11 looking it
        up costs a getpid() syscall, a few µs on a VM)."""
        self.spec = spec
        self.source = source
        self.router = router
        self.counters = counters
        self.clock = clock
        self.lc = Lifecycle(f"{spec.request_id}/{spec.index}",
                            clock() if start is None else start, deadlines)
        self.out = ChoiceOutput()
        self.excluded: set[str] = set()
        self.seam: SeamText | None = None
        self.decision: Decision | None = None  # the first routing decision (cache health)
        self.cached = 0  # prompt tokens the decode worker caches (when it prefills itself)
        self.loop = loop
        self.segments: list[Segment] = []  # decode streams, when a receipt is wanted
        self.prefilled_on: tuple[str, str] | None = None  # (worker, node) of a remote prefill
        self.calls: list[Call] = []  # worker calls, when traced
        # prefix-cache hits of a remote prefill (P's count); None: D prefilled itself
        self.prefill_cached: int | None = None

    @property
    def view(self) -> RequestView:
        return self.spec.view

    # -- routing ----------------------------------------------------------------------------

    def _candidates(self) -> Sequence[WorkerView]:
        """The views to route on: all but the workers this choice already failed on."""
        views = self.source.views()
        classes = self.spec.classes
        if classes is not None:  # prefill, decode, retries and continuations alike
            views = [w for w in views if node_class(w.attributes) in classes]
        constrains = self.spec.constrains
        if constrains is not None:
            views = [w for w in views if constrains(w.worker_id)]
        excluded = self.excluded
        return [w for w in views if w.worker_id not in excluded] if excluded else views

    def _decide(self) -> Decision:
        try:
            return self.router.decide(self.spec.view, self._candidates())
        except NoWorkerAvailable:
            raise failures.no_worker(self.spec.view.model) from None

    def _failed(self, worker_id: str, failure: Failure, detail: str) -> Action:
        if failure is not Failure.BUSY:  # a busy worker is healthy: only this choice skips it
            self.source.mark_failed(worker_id)
        self.excluded.add(worker_id)
        self.lc.fail(failure, f"{worker_id}: {detail}")
        return failures.recovery(self.lc, failure, self.clock())

    def _give_up(self, failure: Failure, detail: str) -> BaseException:
        return failures.give_up(self.lc, failure, detail, self.clock())

    def _rejected(self, e: BackendHTTPError) -> BaseException:
        self.lc.finish_failed(self.clock(), "bad_request")
        return failures.rejection(e)

    # -- the lifecycle ----------------------------------------------------------------------

    async def run(self, emit: Emit) -> ChoiceOutput:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        decision = self.decision = self._decide()
        params: dict[str, Any] | None = None
        if decision.disaggregated:
            params, decision = await self._prefill(decision)
        else:
            self.counters.local_prefill += 1
        self.cached = decision.cached_tokens if not decision.disaggregated else 0
        await self._decode(decision.decode, params, emit)
        return self.out

    async def _prefill(self, decision: Decision) -> tuple[dict[str, Any] | None, Decision]:
        """Remote prefill with retries; returns (kv_transfer_params or None, decision)."""
        spec = self.spec
        while True:
            self.lc.advance(Phase.PREFILL, self.clock(), decision.prefill)
            body = {**spec.body, "prompt": list(spec.prompt), "max_tokens": 1,
                    "stream": False, "kv_transfer_params": dict(_NO_REMOTE)}
            timeout = self.lc.step_timeout(self.clock(), self.lc.deadlines.prefill_s)
            tp = self._call("prefill", decision.prefill) if spec.trace is not None else ""
            try:
                data = await self.source.prefill(decision.prefill, body,
                                                 f"{spec.request_id}-p", max(timeout, 1e-3),
                                                 len(spec.prompt) - decision.cached_tokens,
                                                 traceparent=tp)
            except BackendError as e:
                failure = failures.classify(e)
                if tp:
                    self.calls[-1].finish(self.clock(), failure.value)
                if isinstance(e, BackendHTTPError) and failure is Failure.BAD_REQUEST:
                    raise self._rejected(e) from None
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
            if tp:
                self.calls[-1].finish(self.clock(), "ok")
            if spec.provenance is not None:
                self.prefilled_on = (decision.prefill, spec.provenance(decision.prefill)[0])
            return self._prefilled(data, decision)

    def _prefilled(self, data: Any, decision: Decision) -> tuple[dict[str, Any] | None,
                                                                 Decision]:
        """P's answer: its `kv_transfer_params`, and the decode pick re-made from the experts
        the prompt activated on P (MoE) when P reports them."""
        if not isinstance(data, dict):
            return None, decision
        experts = (data.get("meshd") or {}).get("experts")
        if experts and decision.decode not in self.excluded:
            routed = _expert_counts(experts)
            if routed:
                expert_view = dataclasses.replace(self.spec.view, experts=routed)
                with contextlib.suppress(NoWorkerAvailable):  # keep the first pick
                    decision = decision._replace(
                        decode=self.router.decode_for(expert_view, self._candidates()))
        params = data.get("kv_transfer_params")
        if not isinstance(params, dict):
            return None, decision
        # The prompt's prefix-cache hits are P's: D counts every token it was sent as cached
        usage = data.get("usage")
        details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
        hits = details.get("cached_tokens") if isinstance(details, dict) else None
        self.prefill_cached = hits if type(hits) is int and hits >= 0 else 0
        self.out.cached_tokens = self.prefill_cached  # (also if D fails before its usage)
        return params, decision

    async def _decode(self, worker_id: str, params: dict[str, Any] | None, emit: Emit) -> None:
        self.lc.advance(Phase.TRANSFER if params else Phase.DECODE, self.clock(), worker_id)
        while True:
            if self._remaining() == 0:  # everything was forwarded; only the finish was lost
                self.out.finish_reason = self.out.finish_reason or "length"
                break
            try:
                await self._stream(worker_id, params, emit)
            except (BackendError, TimeoutError) as e:
                worker_id = self._after_stream_failure(worker_id, e)
                params = None  # the new worker prefills prompt + tokens so far itself
                continue
            if self.calls:
                self.calls[-1].finish(self.clock(), "halted" if self.out.finish_reason == HALTED
                                      else "ok", len(self.out.token_ids))
            if self.out.finish_reason is None and self._remaining() != 0:
                raise self._give_up(Failure.WORKER_ERROR, f"{worker_id} ended the stream early")
            break
        self.out.finish_reason = self.out.finish_reason or "length"
        self.lc.advance(Phase.DONE, self.clock())

    def _after_stream_failure(self, worker_id: str, e: BackendError | TimeoutError) -> str:
        """Record a failed decode stream; returns the worker to continue on, or raises."""
        now = self.clock()
        failure = failures.classify(e, self.lc, now)
        if self.calls:
            self.calls[-1].finish(now, failure.value, len(self.out.token_ids))
        if isinstance(e, TimeoutError):  # our own step deadline: a stall, or the end
            detail = f"{worker_id} stalled" if failure is Failure.TIMEOUT else "deadline"
        else:
            detail = str(e)
        if isinstance(e, BackendHTTPError) and failure is Failure.BAD_REQUEST:
            raise self._rejected(e) from None
        if failure is Failure.DEADLINE:
            raise self._give_up(failure, detail) from None
        if self._failed(worker_id, failure, detail) is not Action.CONTINUE_DECODE:
            raise self._give_up(failure, detail) from None
        if self.spec.constrains is not None and self.out.token_ids:
            raise self._give_up(failure, f"{detail}; a choice under a response_format cannot "
                                "continue on another worker once it has produced tokens "
                                "(the format's state is on the worker that failed)") from None
        try:
            d = self._decide()
        except ApiError:  # every worker that could continue has failed this request
            raise self._give_up(failure, detail) from None
        self.counters.continuations += 1
        decode = self.spec.decode_text
        if decode is not None:
            pending = SeamText.pending(decode, self.out.token_ids, "".join(self.out.text))
            self.seam = SeamText(decode, pending, self.spec.stops)
        nxt = d.decode
        self.cached = d.cached_tokens if d.prefill == nxt else 0
        if self.lc.phase is Phase.TRANSFER:
            self.lc.advance(Phase.DECODE, self.clock(), "transfer failed")
        self.lc.redecode(self.clock(), nxt)
        return nxt

    def _call(self, kind: str, worker_id: str) -> str:
        """Record a traced worker call; the `traceparent` it sends."""
        assert self.spec.trace is not None
        span, tp = self.spec.trace.child()
        self.calls.append(Call(kind, worker_id, span, self.clock(), len(self.out.token_ids)))
        return tp

    def _remaining(self) -> int | None:
        if self.spec.max_tokens is None:
            return None
        return max(0, self.spec.max_tokens - len(self.out.token_ids))

    async def _stream(self, worker_id: str, params: dict[str, Any] | None, emit: Emit) -> None:
        d = self.lc.deadlines
        spec = self.spec
        body = {**spec.body, "prompt": [*spec.prompt, *self.out.token_ids], "stream": True,
                "stream_options": {"include_usage": True}, "return_token_ids": True}
        remaining = self._remaining()
        if remaining is not None:
            body["max_tokens"] = remaining
        if params:
            body["kv_transfer_params"] = params
        if (spec.meter is not None and not spec.client_logprobs
                and spec.scores_itself is not None and spec.scores_itself(worker_id)):
            body.pop("logprobs", None)
            body.pop("return_tokens_as_token_ids", None)
            body["meshd_confidence"] = True
        if spec.provenance is not None:
            node, attests = spec.provenance(worker_id)
            self.segments.append(Segment(worker_id, node, len(self.out.token_ids)))
            if attests:
                body["meshd_attest"] = True
        first = self.lc.decode_attempts <= 1
        tp = self._call("decode", worker_id) if spec.trace is not None else ""
        # One timer for the stream: first token within first_token_s, then each next one
        # within inter_token_s, never past the request's deadline.
        loop = self.loop
        assert loop is not None  # set by run()
        deadline = loop.time() + self.lc.remaining(self.clock())
        # Without P's KV the worker prefills the prompt (and the tokens so far) itself.
        queued = 0 if params else len(body["prompt"]) - self.cached
        async with StepTimer(d.first_token_s, d.inter_token_s, deadline, loop) as step, \
                self.source.stream(worker_id, body, f"{spec.request_id}-d",
                                   d.first_token_s, queued, traceparent=tp) as events:
            while batch := await events.next_batch():
                deltas, failed = self._burst(worker_id, batch, first)
                if deltas:  # what was accepted goes out before a failure in the same burst
                    await emit(deltas)
                if failed is not None:
                    raise failed
                if self.out.finish_reason == HALTED:
                    return  # leaving aborts the worker's stream: it frees the request at once
                step.touch()  # after forwarding: a slow client's drain is not a worker stall

    def _burst(self, worker_id: str, batch: list[bytes], first: bool
               ) -> tuple[list[Delta], BackendProtocolError | None]:
        """The deltas of one read burst (accepted into `out`), and the failure that ended
        it, if any. The burst is decoded in one call (a JSON array of its events)."""
        out: list[Delta] = []
        try:
            chunks = orjson.loads(batch[0]) if len(batch) == 1 else orjson.loads(
                b"[%b]" % b",".join(batch))
        except orjson.JSONDecodeError:
            return out, BackendProtocolError("undecodable stream chunk", worker_id)
        for chunk in (chunks,) if len(batch) == 1 else chunks:
            if not isinstance(chunk, dict):
                return out, BackendProtocolError("stream chunk is not an object", worker_id)
            if "error" in chunk:  # vLLM reports mid-stream failures as an error event
                return out, BackendProtocolError(f"error event: {chunk['error']}", worker_id)
            if "meshd" in chunk and self.segments:  # the worker's attestation, after its last token
                self.segments[-1].attestation = attestation_of(chunk["meshd"])
            usage = chunk.get("usage")
            if usage and first:
                details = usage.get("prompt_tokens_details") or {}
                self.out.cached_tokens = (int(details.get("cached_tokens") or 0)
                                          if self.prefill_cached is None
                                          else self.prefill_cached)
            for raw in chunk.get("choices") or ():
                delta = parse_delta(raw)
                if delta.text and not delta.token_ids:  # never forward what we cannot count
                    return out, BackendProtocolError(
                        "text without token ids (return_token_ids)", worker_id)
                if self._accept(delta):
                    out.append(delta)
                    meter = self.spec.meter
                    if meter is not None and delta.finish_reason is None and meter.halted():
                        note = meter.why()
                        self.out.finish_reason, self.out.note = HALTED, note
                        out.append(Delta("", [], None, HALTED, note=note))
                        return out, None
        return out, None

    def _accept(self, delta: Delta) -> bool:
        """Take `delta` into the choice's output; False when it carries nothing to forward."""
        if self.lc.phase is Phase.TRANSFER:
            self.lc.advance(Phase.DECODE, self.clock(), "first token")
        if not delta.token_ids and not delta.text and delta.finish_reason is None:
            return False
        if self.seam is not None:
            delta.text = self.seam.feed(delta)
        self.out.token_ids.extend(delta.token_ids)
        if delta.text:
            self.out.text.append(delta.text)
        if delta.logprobs:
            if self.spec.meter is not None:
                self.spec.meter.observe(delta.logprobs)
            if self.spec.client_logprobs:
                self.out.logprobs.append(delta.logprobs)
            else:
                delta.logprobs = None
        elif delta.confidence is not None and self.spec.meter is not None:
            self.spec.meter.extend(delta.confidence)
        if delta.finish_reason is not None:
            self.out.finish_reason = delta.finish_reason
            self.out.stop_reason = delta.stop_reason
        return True


def _expert_counts(experts: Any) -> dict[int, int]:
    """P's expert signal as `RequestView.experts`: a list of expert ids (each weighs 1) or a
    mapping expert id -> tokens routed. Anything malformed is ignored."""
    try:
        if isinstance(experts, dict):
            return {int(e): int(n) for e, n in experts.items() if int(n) > 0}
        return {int(e): 1 for e in experts}
    except (TypeError, ValueError):
        return {}
