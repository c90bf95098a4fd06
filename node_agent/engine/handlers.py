"""`/v1/completions` and `/v1/chat/completions`: engine requests in, OpenAI responses out.

One HTTP request becomes `n` engine requests with ids `<X-Request-Id>[-i]-<8 hex>` (vLLM ≥ 0.14
style, so prefill and decode never share an id). Their outputs are merged as they arrive. If
the client goes away (disconnect cancels the handler, or a stream write fails) every engine
request still running is aborted through `AsyncEngine.generate`'s cleanup.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from aiohttp import web

from meshd import receipts
from meshd.api_errors import ApiError, invalid, loads_body
from meshd.node_agent.engine.api import EngineRequest, RequestOutput, TokenLogprob
from meshd.node_agent.engine.openai_io import (
    ParsedRequest,
    logprobs_chat,
    logprobs_completion,
    parse_request,
    usage,
)
from meshd.seeds import choice_seed

if TYPE_CHECKING:
    from meshd.node_agent.engine.worker_server import WorkerServer


@dataclass(slots=True)
class Choice:
    """Accumulated output of one engine request."""

    index: int
    request_id: str
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    last: RequestOutput | None = None
    experts: dict[int, int] = field(default_factory=dict)  # top experts -> prompt tokens
    text_offset: int = 0

    def add(self, out: RequestOutput, top_experts: int) -> None:
        self.text.append(out.text_delta)
        self.token_ids.extend(out.new_token_ids)
        self.logprobs.extend(out.logprobs or ())
        self.confidence.extend(out.confidence or ())
        if out.prompt_expert_counts is not None:
            totals = [sum(col) for col in zip(*out.prompt_expert_counts, strict=True)]
            self.experts = {e: totals[e] for e in out.top_experts(top_experts)}
        self.last = out


Merged = AsyncGenerator[tuple[int, RequestOutput], None]


async def merge(gens: list[AsyncGenerator[RequestOutput, None]]) -> Merged:
    """Outputs of several generators as they arrive, tagged with the generator's index.
    Leaving early (or being cancelled) cancels the readers, which aborts their requests."""
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def read(i: int, gen: AsyncGenerator[RequestOutput, None]) -> None:
        try:
            async with contextlib.aclosing(gen):
                async for out in gen:
                    queue.put_nowait((i, out))
            queue.put_nowait((i, None))
        except Exception as exc:
            queue.put_nowait((i, exc))

    tasks = [asyncio.create_task(read(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class CompletionHandler:
    def __init__(self, server: WorkerServer) -> None:
        self.s = server

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        req = parse_request(loads_body(await request.read()), chat, self.s.info)
        kvp = req.kv_transfer_params or {}
        producer, consumer = bool(kvp.get("do_remote_decode")), bool(kvp.get("do_remote_prefill"))
        self._check_disagg(req, producer, consumer)
        suffix = secrets.token_hex(4)
        ids = [f"{rid}-{suffix}"] if req.n == 1 else [f"{rid}-{i}-{suffix}" for i in range(req.n)]
        reqs = [EngineRequest(iid, req.prompt, self._sampling(req, i), hold_blocks_on_finish=
                              producer) for i, iid in enumerate(ids)]
        if producer:
            return await self._produce(request, rid, req, reqs)
        imported = pulled = False
        if consumer and self.s.puller is not None:
            imported = pulled = await self.s.puller.pull(ids[0], req.prompt, kvp)
        try:
            return await self._respond(request, rid, req, reqs, imported, producer,
                                       pulled if consumer else None)
        finally:
            if imported:  # no-op once the request ran; frees the import if it never started
                self.s.driver.abort(ids[0])

    async def _produce(self, request: web.Request, rid: str, req: ParsedRequest,
                       reqs: list[EngineRequest]) -> web.StreamResponse:
        """A prefill for a decode peer: its blocks will be held under a lease, so it must fit
        the lease bounds first (429 otherwise: the gateway prefills elsewhere)."""
        quota, caller = self.s.quota, request.remote or ""
        need = -(-len(req.prompt) // self.s.cfg.block_size)
        refusal = quota.admit(caller, need)
        if refusal is not None:
            raise ApiError(429, refusal.message(caller), err_type="rate_limit_error",
                           code="kv_leases_exhausted", retry_after=1.0)
        try:
            return await self._respond(request, rid, req, reqs, False, True, None)
        finally:
            rid0 = reqs[0].request_id
            blocks = self.s.leases.get(rid0)
            held = len(blocks) if blocks else 0
            quota.settle(caller, need, rid0, held)
            if held and self.s.leases.get(rid0) is None:  # it ended while we settled
                quota.end(rid0)

    async def _respond(self, request: web.Request, rid: str, req: ParsedRequest,
                       reqs: list[EngineRequest], imported: bool, producer: bool,
                       pulled: bool | None) -> web.StreamResponse:
        stream = merge([self.s.driver.generate(r, imported) for r in reqs])
        first = await self._first(stream)  # engine refusals become 400s before any byte
        choices = [Choice(i, r.request_id) for i, r in enumerate(reqs)]
        ctx = _Ctx(rid, req.chat, req, self.s.info.name, int(time.time()))
        headers = {"X-Request-Id": rid}
        if req.stream:
            return await self._stream(request, ctx, choices, first, stream, headers)
        async with contextlib.aclosing(stream):
            self._add(choices, first)
            async for i, out in stream:
                self._add(choices, (i, out))
        body = ctx.response(choices, self.s.info.tokenizer)
        body["kv_transfer_params"] = (self._prefill_params(choices, req.prompt) if producer
                                      else None)
        extra: dict[str, Any] = {"engine_id": self.s.cfg.engine_id,
                                 "experts": choices[0].experts}
        if pulled is not None:
            extra["kv_pulled"] = pulled
        if req.meshd_attest and self.s.attest_key is not None:
            extra["attestations"] = self._attestations(rid, req, choices)
        body["meshd"] = extra
        return web.json_response(body, headers=headers)

    def _attestations(self, rid: str, req: ParsedRequest,
                      choices: list[Choice]) -> list[dict[str, Any]]:
        """The node's signed statement of what each choice produced from the prompt."""
        key = self.s.attest_key
        assert key is not None
        return [receipts.attest(key, model=self.s.info.name, request_id=rid, choice=c.index,
                                prompt_ids=req.prompt, output_ids=c.token_ids,
                                finish_reason=c.last.finish_reason if c.last else None)
                for c in choices]

    def _check_disagg(self, req: ParsedRequest, producer: bool, consumer: bool) -> None:
        role = self.s.cfg.role
        if producer and consumer:
            raise invalid("kv_transfer_params: do_remote_decode and do_remote_prefill are "
                          "exclusive", param="kv_transfer_params")
        if (producer or consumer) and req.n != 1:
            raise invalid("n > 1 is not supported with kv_transfer_params", param="n")
        if producer and req.stream:
            raise invalid("do_remote_decode needs stream=false: kv_transfer_params come back "
                          "in the response body", param="stream")
        if producer and role == "decode":
            raise invalid("this engine has role decode; do_remote_decode needs prefill",
                          param="kv_transfer_params")
        if consumer and role == "prefill":
            raise invalid("this engine has role prefill; do_remote_prefill needs decode",
                          param="kv_transfer_params")

    @staticmethod
    def _sampling(req: ParsedRequest, i: int) -> Any:
        p = req.sampling
        return replace(p, seed=choice_seed(p.seed, i)) if p.seed is not None and i else p

    @staticmethod
    async def _first(stream: Merged) -> tuple[int, RequestOutput]:
        try:
            return await anext(stream)
        except ValueError as e:
            await stream.aclose()
            raise invalid(str(e)) from None

    def _add(self, choices: list[Choice], item: tuple[int, RequestOutput]) -> None:
        choices[item[0]].add(item[1], self.s.cfg.top_experts)

    def _prefill_params(self, choices: list[Choice],
                        prompt: tuple[int, ...]) -> dict[str, Any] | None:
        c = choices[0]
        if c.last is None or c.last.held_block_ids is None:
            return None  # stopped by EOS/stop/abort: nothing held, decode prefills locally
        held = self.s.leases.get(c.request_id)
        if held is None:
            return None
        return self.s.kv_offer.params(request_id=c.request_id, block_ids=held,
                                      engine_id=self.s.cfg.engine_id, peer=self.s.kv_peer,
                                      num_tokens=len(prompt), prompt=prompt)

    async def _stream(self, request: web.Request, ctx: _Ctx, choices: list[Choice],
                      first: tuple[int, RequestOutput],
                      stream: Merged,
                      headers: dict[str, str]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        tok = self.s.info.tokenizer
        async with contextlib.aclosing(stream):  # a failed write aborts the rest
            if ctx.chat:
                for c in choices:
                    await _send(resp, ctx.chunk({"index": c.index, "delta": {
                        "role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}))
            item: tuple[int, RequestOutput] | None = first
            while item is not None:
                c = choices[item[0]]
                c.add(item[1], self.s.cfg.top_experts)
                await _send(resp, ctx.chunk(ctx.delta_choice(c, item[1], tok)))
                item = await anext(stream, None)
        last = ctx.chunk(None, ctx.usage(choices)) if ctx.req.include_usage else None
        if ctx.req.meshd_attest and self.s.attest_key is not None:  # after the last token
            last = last or ctx.chunk(None)
            last["meshd"] = {"attestations": self._attestations(ctx.rid, ctx.req, choices)}
        if last is not None:
            await _send(resp, last)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def _send(resp: web.StreamResponse, payload: dict[str, Any]) -> None:
    await resp.write(b"data: " + json.dumps(payload).encode() + b"\n\n")


@dataclass(frozen=True, slots=True)
class _Ctx:
    """Per-response constants and the OpenAI shapes that depend on chat vs completions."""

    rid: str
    chat: bool
    req: ParsedRequest
    model: str
    created: int

    def usage(self, choices: list[Choice]) -> dict[str, Any]:
        last = [c.last for c in choices if c.last is not None]
        prompt = last[0].num_prompt_tokens if last else len(self.req.prompt)
        cached = last[0].num_cached_tokens if last else 0
        return usage(prompt, sum(o.num_output_tokens for o in last), cached)

    def _head(self, stream: bool) -> dict[str, Any]:
        obj = ("chat.completion" if self.chat else "text_completion") + (
            ".chunk" if stream and self.chat else "")
        return {"id": f"{'chatcmpl' if self.chat else 'cmpl'}-{self.rid}", "object": obj,
                "created": self.created, "model": self.model}

    def chunk(self, choice: dict[str, Any] | None,
              usage_: dict[str, Any] | None = None) -> dict[str, Any]:
        out = {**self._head(True), "choices": [choice] if choice else []}
        if self.req.include_usage:
            out["usage"] = usage_
        return out

    def _lps(self, c: Choice, lps: tuple[TokenLogprob, ...] | list[TokenLogprob] | None,
             tok: Any) -> dict[str, Any] | None:
        if self.req.sampling.logprobs is None or not lps:
            return None
        as_ids = self.req.return_tokens_as_token_ids
        if self.chat:
            return logprobs_chat(tok, lps, as_ids)
        out, c.text_offset = logprobs_completion(tok, lps, c.text_offset, as_ids)
        return out

    def delta_choice(self, c: Choice, out: RequestOutput, tok: Any) -> dict[str, Any]:
        ch: dict[str, Any] = {"index": c.index, "logprobs": self._lps(c, out.logprobs, tok),
                              "finish_reason": out.finish_reason if out.finished else None}
        if self.chat:
            ch["delta"] = {"content": out.text_delta}
        else:
            ch["text"] = out.text_delta
        ch["stop_reason"] = out.stop_reason if out.finished else None
        if self.req.return_token_ids:
            ch["token_ids"] = list(out.new_token_ids)
        if self.req.sampling.confidence:
            ch["meshd_confidence"] = list(out.confidence or ())
        return ch

    def response(self, choices: list[Choice], tok: Any) -> dict[str, Any]:
        rows = []
        for c in choices:
            last = c.last
            row: dict[str, Any] = {"index": c.index, "logprobs": self._lps(c, c.logprobs, tok),
                                   "finish_reason": last.finish_reason if last else None,
                                   "stop_reason": last.stop_reason if last else None}
            text = "".join(c.text)
            if self.chat:
                row["message"] = {"role": "assistant", "content": text, "tool_calls": []}
            else:
                row["text"] = text
            if self.req.return_token_ids:
                row["token_ids"] = c.token_ids
                row["prompt_token_ids"] = list(self.req.prompt)
            if self.req.sampling.confidence:
                row["meshd_confidence"] = c.confidence
            rows.append(row)
        return {**self._head(False), "choices": rows, "usage": self.usage(choices)}
