"""`MeshHandler`: the gateway's request handler for the mesh (disaggregated serving).

Per request: tokenize and hash the prompt once (`PromptBuilder`), build the scheduler's
`RequestView`, run one `ChoiceRun` per choice (`n`), and answer in the client's shape
(`Shaper`): an SSE stream whose chunks are forwarded as workers produce tokens, or one body.
The request's end — an error in any choice, the client leaving, a deadline — ends every choice
it started on every worker: the first choice to fail cancels its siblings (which aborts their
worker connections) before the error goes out. Anthropic Messages, OpenAI Responses and chat
with tools take the same path; their output is parsed and shaped by `dialect_shapes` (tool
calls, reasoning, the dialect's events), and a Responses conversation is kept for
`previous_response_id` (`responses_memory`). A `response_format` (or Responses `text.format`)
other than text takes the mesh path too, on the workers that enforce it while they sample
(vLLM's structured outputs; the pool probes for it) and only on them. Models served only by
plain OpenAI workers go through `passthrough` instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from meshd.coordinator.gateway.config import Deadlines
from meshd.coordinator.gateway.governance.admission import Admitted, Governor
from meshd.coordinator.gateway.http import errors
from meshd.coordinator.gateway.http.api_request import ApiRequest, Endpoint
from meshd.coordinator.gateway.http.errors import ApiError
from meshd.coordinator.gateway.http.openai_api import ChatRequest
from meshd.coordinator.gateway.http.responder import Responder
from meshd.coordinator.gateway.privacy.guard import PrivacyGuard
from meshd.coordinator.gateway.serving.choice import ChoiceRun, ChoiceSpec, Counters
from meshd.coordinator.gateway.serving.confidence import (
    ConfidenceConfig,
    ConfidenceCost,
    ConfidenceMeter,
    check_threshold,
    summary,
)
from meshd.coordinator.gateway.serving.dialect_shapes import (
    ChatToolsShape,
    DialectShape,
    MessagesShape,
    ResponsesShape,
)
from meshd.coordinator.gateway.serving.dialect_stream import stream_dialect
from meshd.coordinator.gateway.serving.output_parsers import OutputParsers
from meshd.coordinator.gateway.serving.passthrough import passthrough
from meshd.coordinator.gateway.serving.prompts import PromptBuilder
from meshd.coordinator.gateway.serving.receipts import (
    HEADER,
    MAX_HEADER_BYTES,
    ReceiptSigner,
    header_value,
    wanted,
)
from meshd.coordinator.gateway.serving.request_metrics import MeshMetrics
from meshd.coordinator.gateway.serving.responses_memory import ResponsesMemory
from meshd.coordinator.gateway.serving.shapes import (
    ChoiceOutput,
    Delta,
    Shaper,
    TokenVocab,
    usage,
)
from meshd.coordinator.gateway.serving.worker_source import PoolSource
from meshd.coordinator.gateway.tools import ToolParser
from meshd.coordinator.gateway.tools.forced import ForcedParser, forced_format
from meshd.coordinator.gateway.tracing.trace import RequestTrace
from meshd.coordinator.gateway.tracing.tracer import Tracer
from meshd.coordinator.gateway.workers.pool import WorkerPool
from meshd.scheduler.router import Router
from meshd.scheduler.types import RequestView
from meshd.seeds import choice_seed

T = TypeVar("T")
# Client fields the gateway owns: never forwarded from the client's body to a worker.
_RESERVED = frozenset({"kv_transfer_params", "return_token_ids", "prompt", "messages",
                       "stream", "stream_options", "n", "max_tokens", "max_completion_tokens",
                       "logprobs", "top_logprobs", "echo", "model",
                       "return_tokens_as_token_ids"})


def constrained(body: Any) -> dict[str, Any] | None:
    """The format the request's workers must enforce (its response_format), or None (text)."""
    if isinstance(body, ChatRequest) and body.response_format is not None \
            and body.response_format.get("type", "text") != "text":
        return body.response_format
    return None


async def run_all(coros: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Await every coroutine. The first to fail cancels the others and its error is raised
    once they have all stopped; cancelling the caller cancels them all the same way."""
    if len(coros) == 1:
        return [await coros[0]]
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        pending = [t for t in tasks if not t.done()]
        for t in pending:
            t.cancel()
        if pending:  # cancelled backend calls abort their connections at once
            await asyncio.wait(pending)
    # Every failure is retrieved (one is raised): an unretrieved task exception is logged
    # from the task's finalizer, and several choices often fail at the same deadline.
    failed = [e for t in tasks if not t.cancelled() and (e := t.exception()) is not None]
    if failed:
        raise failed[0]
    return [t.result() for t in tasks]


class MeshHandler:
    def __init__(self, pool: WorkerPool, router: Router, prompts: PromptBuilder,
                 deadlines: Deadlines | None = None, metrics: MeshMetrics | None = None,
                 clock: Any = time.monotonic, max_inflight: int = 1024,
                 governor: Governor | None = None, privacy: PrivacyGuard | None = None,
                 confidence: ConfidenceConfig | None = None,
                 receipts: ReceiptSigner | None = None, tracer: Tracer | None = None,
                 parsers: OutputParsers | None = None,
                 responses: ResponsesMemory | None = None) -> None:
        self.max_inflight = max_inflight
        self.parsers = parsers or OutputParsers({}, {}, prompts.tokenizer)
        self.responses = responses or ResponsesMemory()
        self.governor = governor
        self.privacy = privacy
        self.receipts = receipts
        self.tracer = tracer
        self.confidence = confidence or ConfidenceConfig()
        self.confidence_cost = ConfidenceCost()
        self.inflight = 0
        self.pool = pool
        self.source = PoolSource(pool)
        self.router = router
        self.prompts = prompts
        self.deadlines = deadlines or Deadlines()
        self.metrics = metrics or MeshMetrics()
        self.counters = Counters()
        self.clock = clock
        self.loop: asyncio.AbstractEventLoop | None = None
        self._vocabs: dict[str, TokenVocab] = {}  # model -> its tokenizer for logprobs
        # Told of each request's finished choices (cache health); must be cheap.
        self.on_runs: Callable[[Sequence[ChoiceRun]], None] | None = None

    def models(self) -> Sequence[str]:
        return self.pool.models()

    async def handle(self, req: ApiRequest, responder: Responder) -> None:
        if self.inflight >= self.max_inflight:
            raise errors.rate_limited(f"This gateway replica is at its limit of "
                                      f"{self.max_inflight} requests in flight; retry shortly.",
                                      retry_after=1.0)
        self.inflight += 1
        if self.loop is None:  # a handler serves one loop; finding it costs a syscall
            self.loop = asyncio.get_running_loop()
        tracer = self.tracer
        if tracer is None:
            try:
                await self._handle(req, responder, None)
            finally:
                self.inflight -= 1
            return
        trace = tracer.begin(req, self.clock())
        status, outcome = 0, "cancelled"
        try:
            await self._handle(req, responder, trace)
            status, outcome = responder.status or 200, "ok"
        except ApiError as e:
            status = e.status if not responder.started else responder.status
            outcome = ("timeout" if e.status == 504 else
                       "refused" if e.status in (403, 429) else "error")
            raise
        except Exception:
            status, outcome = 500, "error"
            raise
        finally:
            self.inflight -= 1
            trace.close(self.clock(), status, outcome)
            tracer.finished(trace)

    async def _handle(self, req: ApiRequest, responder: Responder,
                      trace: RequestTrace | None) -> None:
        body = req.body
        block_size = self.pool.block_size(body.model)
        if block_size is None:
            raise ApiError(404, f"The model {body.model!r} does not exist.", param="model",
                           err_type="not_found_error", code="model_not_found")
        classes = None
        if req.endpoint is Endpoint.RESPONSES:  # the stored conversation it continues
            req = await self.responses.resolve(req)
            body = req.body
        if self.privacy is not None:  # before tokenizing: masking changes the prompt
            req, classes = self.privacy.check(req, self.pool.node_attributes)
            body = req.body
        receipt = self._wants_receipt(req)
        if req.dialect is not None and self.pool.passthrough(body.model):
            raise ApiError(400, f"The model {body.model!r} is served only by plain OpenAI "
                           f"workers, which meshd passes requests through to as they are; "
                           f"{req.endpoint.value} needs the mesh path (a vLLM or meshd "
                           f"worker).", param="model", code="dialect_unavailable")
        if self.pool.passthrough(body.model):
            if receipt and req.receipt:  # asked for: say why not (a tenant default: none)
                raise ApiError(400, "Receipts need the mesh path: this request is passed "
                               "through as it is (a model only plain OpenAI workers serve), "
                               "so the gateway does not see its tokens.",
                               code="receipt_unavailable")
            if trace is not None:
                trace.passthrough = True
            await self._passthrough(req, responder, classes)
            return
        fmt = constrained(body)
        if fmt is not None and not self.pool.constrained_model(body.model):
            param = "text.format" if req.endpoint is Endpoint.RESPONSES else "response_format"
            raise ApiError(400, f"Structured output ({param} {fmt['type']}) "
                           f"needs workers that enforce it while they sample (vLLM's structured "
                           f"outputs); no worker of the model {body.model!r} does (meshd's "
                           f"embedded engine does not). Ask for text.", param=param,
                           code="unsupported_format")
        prompt = self.prompts.build(req, block_size)
        if trace is not None:
            trace.prompt_tokens = len(prompt.token_ids)
        adm = None if self.governor is None else await self.governor.admit(req, prompt.token_ids)
        try:
            await self._serve(req, responder, prompt.token_ids, prompt.block_hashes, adm,
                              classes, receipt, trace, prompt.cache_hint_tokens)
        finally:
            if adm is not None and not adm.done:  # the client left, or a deadline: settle
                adm.finish(0, 0)

    async def _passthrough(self, req: ApiRequest, responder: Responder,
                           classes: frozenset[str] | None) -> None:
        """Governed on an estimate: the worker tokenizes, so the prompt is ~4 bytes a token
        and the reservation is settled as made."""
        if self.governor is None:
            await passthrough(self.pool, self.deadlines, req, responder, classes)
            return
        adm = await self.governor.admit(req, None, approx_prompt=len(req.raw) // 4)
        try:
            await passthrough(self.pool, self.deadlines, req, responder, classes)
        finally:
            adm.finish(adm.completion, 0)

    async def _serve(self, req: ApiRequest, responder: Responder, prompt_ids: tuple[int, ...],
                     block_hashes: Any, adm: Admitted | None,
                     classes: frozenset[str] | None = None, receipt: bool = False,
                     trace: RequestTrace | None = None, cache_hint: int = 0) -> None:
        body = req.body
        max_tokens = body.sampling.max_tokens or (adm.max_tokens if adm else None)
        view = RequestView(request_id=req.request_id, model=body.model,
                           num_prompt_tokens=len(prompt_ids), block_hashes=block_hashes,
                           max_tokens=max_tokens or 16, cache_hint_tokens=cache_hint)
        start = self.clock()
        halt = self._halt_below(req)
        forced = self._forced(body)
        fmt = forced[0] if forced is not None else constrained(body)
        runs = self._runs(req, view, prompt_ids, start, max_tokens, classes, halt, receipt,
                          trace, fmt)
        timing = self.metrics.request(start)
        shaper = self._shape(req, ForcedParser(forced[1]) if forced is not None else None)
        headers = adm.headers if adm is not None else b""
        if trace is not None:
            trace.runs = runs
            headers += b"x-meshd-trace-id: %032x\r\n" % trace.ctx.trace_id
        sign = self._signer(req, shaper, prompt_ids, runs) if receipt else None
        try:
            if isinstance(shaper, DialectShape) and body.stream:
                keep = (self._keeper(req, shaper) if isinstance(shaper, ResponsesShape)
                        else None)
                await stream_dialect(runs, shaper, responder, timing, len(prompt_ids),
                                     headers, sign, _usage, run_all, keep)
            elif body.stream:
                assert isinstance(shaper, Shaper)
                await self._stream(runs, shaper, responder, req, timing, len(prompt_ids),
                                   headers, sign)
            else:
                outputs = await run_all([r.run(timing.emit) for r in runs])
                signed = sign(outputs) if sign is not None else None
                out = shaper.body(outputs, _usage(len(prompt_ids), outputs, runs),
                                  None if signed is None else {"receipt": signed})
                value = header_value(signed) if signed is not None else b""
                if value and len(value) <= MAX_HEADER_BYTES:  # clients cap header blocks
                    headers += b"%b: %b\r\n" % (HEADER, value)
                if isinstance(shaper, ResponsesShape):  # stored before the client has it
                    await self.responses.keep(req, shaper)
                responder.send(200, out, headers=headers)
            timing.done("ok")
        except ApiError as e:
            timing.done("timeout" if e.status == 504 else "error")
            raise
        except BaseException:
            timing.done("cancelled")
            raise
        finally:
            if trace is not None and timing.first:
                trace.ttft = timing.first - start
            self.metrics.observe_runs(runs)
            if self.on_runs is not None:
                self.on_runs(runs)
            if adm is not None:
                settle(adm, runs)

    def _keeper(self, req: ApiRequest, shape: ResponsesShape
                ) -> Callable[[], Coroutine[Any, Any, None]]:
        async def keep() -> None:
            await self.responses.keep(req, shape)
        return keep

    def _forced(self, body: Any) -> tuple[dict[str, Any], str | None] | None:
        """The format that enforces the request's tool choice (a named tool, or `required`)
        and the forced tool's name, where the model's workers enforce formats; else None
        (the choice is then only rendered by the template: docs/api.md)."""
        conv = body.conversation if isinstance(body, ChatRequest) else None
        if conv is None or conv.tool_choice is None or conv.tool_choice.mode in ("auto",
                                                                                 "none"):
            return None
        forced = forced_format(conv.tools, conv.tool_choice, conv.parallel_tool_calls)
        return forced if forced is not None and self.pool.constrained_model(body.model) \
            else None

    def _shape(self, req: ApiRequest, forced: ToolParser | None = None
               ) -> Shaper | DialectShape:
        """How the response is written: the dialect's shape, chat's with an output parser when
        there are tools to parse (or a reasoning parser; `forced`: the parser of an enforced
        tool choice), else the plain `Shaper`."""
        body = req.body
        conv = body.conversation if isinstance(body, ChatRequest) else None
        tools = conv is not None and bool(conv.tools) and (
            conv.tool_choice is None or conv.tool_choice.mode != "none")
        parser = forced or self.parsers.for_request(body.model, tools)
        if req.endpoint is Endpoint.MESSAGES:
            return MessagesShape(parser or self.parsers.plain(), body.model, req.request_id)
        if req.endpoint is Endpoint.RESPONSES:
            return ResponsesShape(parser or self.parsers.plain(), body.model, req.request_id,
                                  req.dialect)
        if parser is not None and isinstance(body, ChatRequest):
            return ChatToolsShape(parser, body.model, req.request_id, body.sampling.n,
                                  body.include_usage)
        return Shaper(req, vocab=self._vocab(body.model))

    def _vocab(self, model: str) -> TokenVocab:
        vocab = self._vocabs.get(model)
        if vocab is None:
            tok = self.prompts.tokenizer(model)
            vocab = self._vocabs[model] = TokenVocab(tok.decode, tok.token_bytes)
        return vocab

    def _tenant(self, req: ApiRequest) -> str | None:
        gov = self.governor
        return req.tenant or (gov.config.default_tenant if gov is not None else None)

    def _wants_receipt(self, req: ApiRequest) -> bool:
        """A signed receipt for `req`: its x-meshd-receipt header, else its tenant's policy."""
        if self.receipts is None:
            return False
        gov = self.governor
        default = gov is not None and gov.policy.of(self._tenant(req) or "").receipts
        return wanted(req.receipt, default)

    def _signer(self, req: ApiRequest, shaper: Shaper | DialectShape,
                prompt_ids: tuple[int, ...],
                runs: list[ChoiceRun]) -> Callable[[Sequence[ChoiceOutput]],
                                                   dict[str, Any] | None]:
        """Signs the receipt of the finished choices (the request's facts taken now)."""
        signer = self.receipts
        assert signer is not None
        created = int(time.time() * 1000)
        tenant = self._tenant(req)

        def sign(outputs: Sequence[ChoiceOutput]) -> dict[str, Any] | None:
            return signer.build(request_id=req.request_id, response_id=shaper.id,
                                model=req.body.model, tenant=tenant, created_ms=created,
                                prompt_ids=prompt_ids, runs=runs, outputs=outputs)
        return sign

    def _halt_below(self, req: ApiRequest) -> float | None:
        """The confidence threshold of `req` (0: scored, never halted), or None when it is
        not scored at all: the client's x-meshd-halt-below, else its tenant's
        `confidence_halt_below`, else `[gateway.confidence]` when enabled."""
        if req.halt_below:
            try:
                value = float(req.halt_below)
                check_threshold(value, "x-meshd-halt-below")
            except ValueError:
                raise ApiError(400, f"x-meshd-halt-below must be a number in [0, 1), got "
                               f"{req.halt_below!r}.", code="invalid_halt_below") from None
            return value
        gov = self.governor
        if gov is not None:
            tenant = gov.policy.of(req.tenant or gov.config.default_tenant)
            if tenant.confidence_halt_below:
                return tenant.confidence_halt_below
        return self.confidence.halt_below if self.confidence.enabled else None

    def _runs(self, req: ApiRequest, view: RequestView, prompt: tuple[int, ...],
              start: float, max_tokens: int | None,
              classes: frozenset[str] | None = None,
              halt: float | None = None, receipt: bool = False,
              trace: RequestTrace | None = None,
              fmt: dict[str, Any] | None = None) -> list[ChoiceRun]:
        """`fmt`: the format the workers enforce (a response_format, or an enforced tool
        choice's)."""
        body = req.body
        s = body.sampling
        worker_body = self._worker_body(req)
        if fmt is not None:
            worker_body["response_format"] = fmt
        client_logprobs = "logprobs" in worker_body
        if halt is not None and not client_logprobs:  # asked for the meter only
            worker_body["logprobs"] = self.confidence.top_logprobs
            worker_body["return_tokens_as_token_ids"] = True
        decode = self.prompts.tokenizer(body.model).decode
        provenance = self.pool.provenance if receipt else None
        ctx = trace.ctx if trace is not None else None
        runs = []
        for i in range(s.n):
            wb = worker_body if s.seed is None else {**worker_body,
                                                     "seed": choice_seed(s.seed, i)}
            meter = None if halt is None else ConfidenceMeter(self.confidence.window, halt,
                                                              self.confidence_cost)
            spec = ChoiceSpec(req.request_id, i, view, prompt, wb, max_tokens, s.stop, decode,
                              classes, meter, client_logprobs, provenance,
                              self.pool.scores_itself if meter is not None else None, ctx,
                              self.pool.constrains if fmt is not None else None)
            runs.append(ChoiceRun(spec, self.source, self.router, self.deadlines,
                                  self.counters, self.clock, start, self.loop))
        return runs

    @staticmethod
    def _worker_body(req: ApiRequest) -> dict[str, Any]:
        """The sampling fields every choice sends its workers (seeds are set per choice)."""
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
        if isinstance(body, ChatRequest):
            if body.logprobs:
                out["logprobs"] = body.top_logprobs or 0
        elif body.logprobs is not None:
            out["logprobs"] = body.logprobs
        if "logprobs" in out:  # keyed by token id: tokens that decode alike stay apart
            out["return_tokens_as_token_ids"] = True
        if body.user:
            out["user"] = body.user
        return out

    async def _stream(self, runs: list[ChoiceRun], shaper: Shaper, responder: Responder,
                      req: ApiRequest, timing: Any, prompt_tokens: int, headers: bytes,
                      sign: Callable[[Sequence[ChoiceOutput]], dict[str, Any] | None] | None
                      ) -> None:
        def emitter(i: int) -> Callable[[list[Delta]], Coroutine[Any, Any, None]]:
            async def emit(deltas: list[Delta]) -> None:  # one write per worker read burst
                timing.burst(deltas)
                if not responder.started:
                    await responder.start_stream(headers=headers)
                await responder.send_events([shaper.chunk(i, d) for d in deltas])
            return emit

        outputs: list[ChoiceOutput] = await run_all(
            [r.run(emitter(i)) for i, r in enumerate(runs)])
        if not responder.started:
            await responder.start_stream(headers=headers)
        if req.body.include_usage:
            await responder.send_event(shaper.usage_chunk(_usage(prompt_tokens, outputs, runs)))
        signed = sign(outputs) if sign is not None else None
        if signed is not None:  # the last chunk: after every token and the usage
            await responder.send_event(shaper.meshd_chunk({"receipt": signed}))
        await responder.end_stream()


def _usage(prompt_tokens: int, outputs: Sequence[ChoiceOutput],
           runs: Sequence[ChoiceRun]) -> dict[str, Any]:
    """OpenAI's usage, with meshd's confidence summary when the choices were scored."""
    out = usage(prompt_tokens, outputs)
    meters = [r.spec.meter for r in runs if r.spec.meter is not None]
    scored = summary(meters) if meters else None
    if scored is not None:
        out["meshd"] = scored
    return out


def settle(adm: Admitted, runs: Sequence[ChoiceRun]) -> None:
    """What the request's choices produced, however they ended, settles its reservation."""
    completion = cached = 0
    for r in runs:
        completion += len(r.out.token_ids)
        cached = max(cached, r.out.cached_tokens)
    adm.finish(completion, cached, runs[0].out.token_ids if runs else ())
