"""meshd's confidence scorer for vLLM workers: an ASGI middleware in vLLM's own API server.

    vllm serve MODEL --middleware meshd.node_agent.vllm_scorer.ConfidenceScorer

(`meshd agent` adds it to the vLLM workers it starts; `[[agent.vllm]] score_confidence`.) The
gateway's confidence meter scores every token from the workers' top-k logprobs. Over vLLM that
cost the gateway ~55 us of scoring and ~120-220 us of decoding the larger chunks per 24-token
choice, where meshd's engine answers one float per token (`meshd_confidence`). vLLM's logits
processors have no channel to return per-token values, so the scoring moves into vLLM's API
server process instead, at its HTTP edge, where each worker pays for its own requests:

- a `POST /v1/completions` whose JSON body carries `"meshd_confidence": true` (what the
  gateway's worker probe and its decode requests send) has that field taken out and, unless
  the caller asked for logprobs itself, `logprobs` set to `TOP_LOGPROBS` (5, the default of
  the gateway's `[gateway.confidence] top_logprobs`);
- in the answer (a JSON body, or each `data:` event of a stream) every choice gains
  `meshd_confidence`: one float per token, `meshd.confidence.token_confidence` of its
  logprobs (the estimate the gateway computed itself before; None where vLLM gave none), and
  loses the logprobs the caller did not ask for.

So the gateway's probe finds a worker that scores its tokens, and the meter adds the floats
as it does for meshd's engine. Every other request, and any answer but a 200, passes through
untouched; an answer that is not the JSON expected is sent on as it came. Standard library
only (plus orjson where vLLM has it): meshd is installed in vLLM's venv without its
dependencies.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from meshd.confidence import token_confidence

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

FIELD = b'"meshd_confidence"'
TOP_LOGPROBS = 5  # alternatives asked of vLLM per token
MAX_BODY = 64 << 20  # a request body past this is passed on unread past what was read

try:  # vLLM's venv usually has orjson; the standard library does the same, slower
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
    _dumps: Callable[[Any], bytes] = orjson.dumps
except ImportError:  # pragma: no cover - depends on the venv
    _loads = json.loads

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


def score_choice(choice: dict[str, Any], strip: bool) -> None:
    """Add `meshd_confidence` to one completions choice (from its `logprobs`), and drop the
    logprobs when the caller did not ask for them."""
    lp = choice.get("logprobs")
    if strip:
        choice["logprobs"] = None
    if not isinstance(lp, dict):
        ids = choice.get("token_ids")
        if isinstance(ids, list) and ids:  # tokens without logprobs: not scored
            choice["meshd_confidence"] = [None] * len(ids)
        return
    sampled = lp.get("token_logprobs") or ()
    tops = lp.get("top_logprobs") or ()
    tokens = lp.get("tokens") or ()
    out: list[float | None] = []
    for i, s in enumerate(sampled):
        top = tops[i] if i < len(tops) else None
        try:
            out.append(token_confidence(s, top if isinstance(top, dict) else None,
                                        tokens[i] if i < len(tokens) else None))
        except TypeError:  # not a number: not scored
            out.append(None)
    choice["meshd_confidence"] = out


def rewrite(body: bytes, strip: bool) -> bytes:
    """One JSON answer (a body or an event's data) with its choices scored; `body` unchanged
    when it is not a JSON object with choices."""
    try:
        obj = _loads(body)
    except ValueError:
        return body
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list):
        return body
    for choice in choices:
        if isinstance(choice, dict):
            score_choice(choice, strip)
    return _dumps(obj)


def rewrite_events(data: bytes, strip: bool) -> bytes:
    """Complete server-sent events (each ends with a blank line), their `data:` JSON scored."""
    out = []
    for event in data.split(b"\n\n"):
        if event.startswith(b"data: ") and event != b"data: [DONE]":
            event = b"data: " + rewrite(event[6:], strip)
        out.append(event)
    return b"\n\n".join(out)


class ConfidenceScorer:
    """The ASGI middleware (see the module docstring). `top_logprobs`: alternatives asked of
    vLLM per token (vLLM's `--middleware` builds it with the default)."""

    def __init__(self, app: App, top_logprobs: int = TOP_LOGPROBS) -> None:
        if not 1 <= top_logprobs <= 20:
            raise ValueError(f"top_logprobs: must be in 1..20, got {top_logprobs}")
        self.app = app
        self.top_logprobs = top_logprobs
        self.scored = 0  # requests scored (for tests and debugging)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope.get("type") != "http" or scope.get("method") != "POST"
                or scope.get("path") != "/v1/completions"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more, early = 0, True, None
        while more:
            message = await receive()
            if message.get("type") != "http.request":  # the client left while sending
                early = message
                break
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = bool(message.get("more_body"))
            if size > MAX_BODY:
                break
        body = b"".join(chunks)
        strip = None
        if early is None and not more and FIELD in body:
            body, strip = self._request(body)
        if strip is not None:
            scope = {**scope, "headers": [
                (k, str(len(body)).encode() if k.lower() == b"content-length" else v)
                for k, v in scope.get("headers", ())]}
            self.scored += 1
        await self.app(scope, _replay(body, more, early, receive),
                       send if strip is None else _Answer(send, strip))

    def _request(self, body: bytes) -> tuple[bytes, bool | None]:
        """The body as vLLM should see it, and whether to strip the logprobs from the answer
        (None: not a request to score; the body as it came)."""
        try:
            obj = _loads(body)
        except ValueError:
            return body, None  # vLLM answers it (400)
        if not isinstance(obj, dict) or obj.get("meshd_confidence") is not True:
            return body, None
        del obj["meshd_confidence"]
        own = obj.get("logprobs")
        strip = own is None or own is False
        if strip:
            obj["logprobs"] = self.top_logprobs
        return _dumps(obj), strip


def _replay(body: bytes, more: bool, early: Message | None, receive: Receive) -> Receive:
    """A receive that gives the app the body read already, then what the client sends next
    (its disconnect, above all: the worker aborts a request whose client left)."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": more}]
    if early is not None:
        pending.append(early)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


class _Answer:
    """Wraps `send`: scores a 200's choices; anything else goes out as it came."""

    __slots__ = ("_buf", "_held", "_mode", "_send", "_strip")

    def __init__(self, send: Send, strip: bool) -> None:
        self._send, self._strip = send, strip
        self._mode = ""  # "pass" | "json" | "stream", set by the start message
        self._held: Message | None = None  # a JSON answer's start, sent with its new length
        self._buf = b""

    async def __call__(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "http.response.start":
            headers = message.get("headers") or ()
            ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"")
            if message.get("status") != 200:
                self._mode = "pass"
            elif ctype.startswith(b"text/event-stream"):
                self._mode = "stream"
                message = {**message, "headers": [(k, v) for k, v in headers
                                                  if k.lower() != b"content-length"]}
            elif ctype.startswith(b"application/json"):
                self._mode, self._held = "json", message
                return
            else:
                self._mode = "pass"
            await self._send(message)
            return
        if kind != "http.response.body" or self._mode == "pass":
            await self._send(message)
            return
        more = bool(message.get("more_body"))
        data = self._buf + message.get("body", b"")
        if self._mode == "json":
            if more:
                self._buf = data
                return
            self._buf = b""
            out = rewrite(data, self._strip)
            held = self._held
            assert held is not None
            self._held = None
            await self._send({**held, "headers": [
                (k, str(len(out)).encode() if k.lower() == b"content-length" else v)
                for k, v in held.get("headers") or ()]})
            await self._send({**message, "body": out})
            return
        # a stream: score the events complete so far, keep a partial one for the next body
        cut = data.rfind(b"\n\n")
        if cut < 0 and more:
            self._buf = data
            return
        if more:
            done, self._buf = data[:cut], data[cut + 2:]
            out = rewrite_events(done, self._strip) + b"\n\n"
        else:
            self._buf = b""
            out = rewrite_events(data, self._strip)
        await self._send({**message, "body": out})
