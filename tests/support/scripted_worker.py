"""A test-only worker that replays scripted completions, for the tool-call and dialect tests.

The embedded engine's random weights cannot produce a real tool call, so these tests put this
worker behind the real gateway (as a static worker): it speaks the part of vLLM's protocol the
mesh path uses (`POST /v1/completions` with a token-id prompt, `return_token_ids`, streaming,
`stream_options.include_usage`, `max_tokens`, `stop`) and answers each request with the next
scripted reply (a 1-token request, the gateway pool's protocol probe, gets one token and
leaves the script alone, and is not kept in `prompts`). A `response_format` is refused (HTTP
400, as meshd's embedded engine does) unless the worker is made with `constrains=True`.
Token ids are the reply's encoding by the model's tokenizer (default: its UTF-8 bytes, as
the gateway's byte tokenizer reads them), sent a few whole characters per chunk. Every other
prompt it receives is kept (`prompts`, token ids), so a test can decode what the gateway's
chat template made of a conversation.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

from aiohttp import web

from meshd.node_agent.engine.tokenizer import ByteTokenizer, Tokenizer


class ScriptedWorker:
    """`tokenizer`: the served model's (the gateway's for this model); default bytes."""

    def __init__(self, model: str = "scripted", chars_per_chunk: int = 3,
                 tokenizer: Tokenizer | None = None, constrains: bool = False) -> None:
        """`constrains`: it takes a `response_format` (as vLLM does; the script is what it
        "samples" under it), else it refuses one with a 400 (as meshd's embedded engine)."""
        self.model = model
        self.constrains = constrains
        self.tok = tokenizer or ByteTokenizer()
        self.chars_per_chunk = chars_per_chunk
        self.replies: deque[str] = deque()
        self.cached_tokens = 0  # what its usage reports as served from its prefix cache
        self.prompts: list[list[int]] = []
        self.bodies: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    def script(self, *replies: str) -> None:
        """Queue replies: each request takes the next (the last one repeats)."""
        self.replies.extend(replies)

    def prompt_text(self, i: int = -1) -> str:
        """The i-th prompt received, decoded with the byte tokenizer."""
        return self.tok.decode(self.prompts[i])

    async def start(self) -> int:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_post("/v1/completions", self._completions)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model,
                                                               "object": "model"}]})

    async def _health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def _next(self) -> str:
        if not self.replies:
            return "(no script)"
        return self.replies.popleft() if len(self.replies) > 1 else self.replies[0]

    def _pieces(self, req: dict[str, Any]) -> tuple[list[tuple[str, list[int]]], str, Any]:
        """The reply cut to `max_tokens` bytes and at the first `stop` string, in chunks;
        finish reason; stop reason."""
        if req.get("max_tokens") == 1:  # the pool's protocol probe: leaves the script alone
            return [("x", [120])], "length", None
        text, finish, stop_reason = self._next(), "stop", None
        for s in req.get("stop") or ():
            i = text.find(s)
            if i >= 0:
                text, stop_reason = text[:i], s
        out: list[tuple[str, list[int]]] = []
        budget = int(req.get("max_tokens") or 1 << 30)
        step = self.chars_per_chunk
        for k in range(0, len(text), step):
            piece = text[k:k + step]
            ids = self.tok.encode(piece, add_bos=False)
            if len(ids) > budget:  # cut whole pieces: the ids still spell the text sent
                finish, stop_reason = "length", None
                break
            budget -= len(ids)
            out.append((piece, ids))
        return out, finish, stop_reason

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        req = await request.json()
        fmt = req.get("response_format")
        if fmt is not None and fmt.get("type") != "text" and not self.constrains:
            return web.json_response({"error": {"message": "response_format is not supported",
                                                "type": "invalid_request_error"}}, status=400)
        prompt = req.get("prompt")
        ids = list(prompt) if isinstance(prompt, list) else []
        if req.get("max_tokens") != 1:  # the probe is not one of the requests a test sends
            self.bodies.append(req)
            self.prompts.append(ids)
        pieces, finish, stop_reason = self._pieces(req)
        n_out = sum(len(p) for _, p in pieces)
        usage = {"prompt_tokens": len(ids), "completion_tokens": n_out,
                 "total_tokens": len(ids) + n_out,
                 "prompt_tokens_details": {"cached_tokens": min(self.cached_tokens,
                                                                len(ids))}}
        base = {"id": "cmpl-scripted", "object": "text_completion", "created": 1700000000,
                "model": self.model}
        if not req.get("stream"):
            out = [i for _, p in pieces for i in p]
            choice = {"index": 0, "text": "".join(t for t, _ in pieces), "token_ids": out,
                      "logprobs": None, "finish_reason": finish, "stop_reason": stop_reason}
            return web.json_response({**base, "choices": [choice], "usage": usage})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)

        async def send(obj: dict[str, Any]) -> None:
            await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        for k, (piece, ids) in enumerate(pieces):
            last = k == len(pieces) - 1
            await send({**base, "choices": [{
                "index": 0, "text": piece, "token_ids": ids, "logprobs": None,
                "finish_reason": finish if last else None,
                "stop_reason": stop_reason if last else None}]})
        if not pieces:
            await send({**base, "choices": [{"index": 0, "text": "", "token_ids": [],
                                             "logprobs": None, "finish_reason": finish,
                                             "stop_reason": stop_reason}]})
        if (req.get("stream_options") or {}).get("include_usage"):
            await send({**base, "choices": [], "usage": usage})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
