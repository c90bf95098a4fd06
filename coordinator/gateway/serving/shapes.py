"""Response shapes: worker completion chunks in, OpenAI chat/completion responses out.

The gateway always talks to workers through `/v1/completions` with token-id prompts and
`return_token_ids`, and builds the client's response itself, so a request can move between
workers mid-stream without the client seeing a seam. `Delta` is one worker chunk's worth of
one choice; logprobs are kept in completions form and converted for the client.

Logprobs: workers are asked for completions-form logprobs with `return_tokens_as_token_ids`
(vLLM's flag; the engine has it too), so every token is named `token_id:<id>` and two ids that
decode alike stay two entries. With the model's `TokenVocab`, `chat_logprobs` builds OpenAI's
chat form (exactly `top_logprobs` alternatives per position, highest first, each with its
text and its own `bytes`) and `completion_logprobs` OpenAI's completions form (tokens as text,
`text_offset` counted in the choice's text). Names that are not `token_id:<id>` (a worker
without the flag) are taken as the token's text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from meshd.coordinator.gateway.http.api_request import ApiRequest, Endpoint
from meshd.coordinator.gateway.http.openai_api import ChatRequest


@dataclass(slots=True)
class Delta:
    text: str
    token_ids: list[int]
    logprobs: dict[str, Any] | None  # completions form: tokens, token_logprobs, top_logprobs
    finish_reason: str | None
    stop_reason: int | str | None = None
    note: str | None = None  # why the gateway ended the choice (a confidence halt)
    confidence: list[Any] | None = None  # the worker's own scores, one per token (meshd)


def parse_delta(choice: Mapping[str, Any]) -> Delta:
    """One choice of a worker's completion chunk (or full response); the Delta takes over the
    decoded chunk's objects (no copies on the hot path)."""
    text = choice.get("text")
    if type(text) is not str:
        text = str(text or "")
    ids = choice.get("token_ids")
    if type(ids) is not list:
        ids = list(ids or ())
    return Delta(text, ids, choice.get("logprobs"), choice.get("finish_reason"),
                 choice.get("stop_reason"), None, choice.get("meshd_confidence"))


class SeamText:
    """Text of a choice after it moved to another worker mid-stream.

    The new worker decodes its tokens without the earlier ones, so a character split across
    the two workers (a multi-byte UTF-8 sequence, a BPE merge) would come out garbled. From the
    seam on, the gateway decodes the token ids itself with the model's tokenizer, holding back
    trailing U+FFFD and a possible partial stop string like the engines do, and cutting at the
    stop string the worker reports. Only the failure path pays for this.
    """

    def __init__(self, decode: Any, pending: list[int], stops: Sequence[str]) -> None:
        self.decode = decode
        self.ids = list(pending)
        self.sent = 0
        self.hold = max((len(s) for s in stops), default=1) - 1

    @staticmethod
    def pending(decode: Any, ids: Sequence[int], sent_text: str, window: int = 8) -> list[int]:
        """The trailing ids whose text was not forwarded yet (held back by the old worker)."""
        for k in range(min(len(ids), window) + 1):
            if decode(ids[:len(ids) - k]) == sent_text:
                return list(ids[len(ids) - k:])
        return []

    def feed(self, d: Delta) -> str:
        self.ids.extend(d.token_ids)
        text = self.decode(self.ids)
        end = len(text)
        if d.finish_reason is None:
            end -= self.hold
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
        elif d.finish_reason == "stop" and isinstance(d.stop_reason, str) and d.stop_reason:
            i = text.find(d.stop_reason, max(0, self.sent - len(d.stop_reason)))
            end = i if i >= 0 else end
        if end <= self.sent:
            return ""
        out, self.sent = text[self.sent:end], end
        return out


@dataclass(slots=True)
class ChoiceOutput:
    """What one choice produced, for non-streaming responses and usage."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0
    note: str | None = None  # why the gateway ended the choice (a confidence halt)
    stop_reason: int | str | None = None  # the worker's: the stop string (or token) it matched


class TokenVocab(NamedTuple):
    """The served model's tokenizer as logprobs need it (`node_agent.engine.tokenizer`):
    `decode(ids)` for a token's text, `token_bytes(id)` for its raw bytes."""

    decode: Callable[[Sequence[int]], str]
    token_bytes: Callable[[int], bytes]


TOKEN_ID_PREFIX = "token_id:"


def token_id_of(name: str) -> int | None:
    """The id in a `token_id:<id>` token name, or None if `name` is not one."""
    if not name.startswith(TOKEN_ID_PREFIX):
        return None
    digits = name[len(TOKEN_ID_PREFIX):]
    return int(digits) if digits.isascii() and digits.isdigit() else None


def _text(name: str, vocab: TokenVocab | None) -> tuple[str, bytes]:
    """A worker's token name as (text, bytes)."""
    tid = token_id_of(name) if vocab is not None else None
    if tid is None or vocab is None:
        return name, name.encode("utf-8", "replace")
    return vocab.decode([tid]), vocab.token_bytes(tid)


def _entry(name: str, logprob: float, vocab: TokenVocab | None, as_ids: bool) -> dict[str, Any]:
    text, raw = _text(name, vocab)
    return {"token": name if as_ids else text, "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(lp: Mapping[str, Any] | None, top_n: int, vocab: TokenVocab | None = None,
                  as_ids: bool = False) -> dict[str, Any] | None:
    """Completions-form logprobs -> chat form: per position the sampled token and its
    `top_n` most likely alternatives (fewer only if the worker sent fewer), highest first
    (ties keep the worker's order). `as_ids` keeps the `token_id:<id>` names (the client asked
    for `return_tokens_as_token_ids`)."""
    if not lp:
        return None
    content = []
    tops = lp.get("top_logprobs") or []
    for i, (tok, val) in enumerate(zip(lp.get("tokens") or [], lp.get("token_logprobs") or [],
                                       strict=False)):
        top = tops[i] if i < len(tops) and tops[i] else {}
        ranked = sorted(top.items(), key=lambda kv: -kv[1])[:top_n]
        content.append({**_entry(str(tok), val, vocab, as_ids),
                        "top_logprobs": [_entry(t, v, vocab, as_ids) for t, v in ranked]})
    return {"content": content, "refusal": None}


def completion_logprobs(lp: Mapping[str, Any] | None, vocab: TokenVocab | None = None,
                        offset: int = 0, as_ids: bool = False
                        ) -> tuple[dict[str, Any] | None, int]:
    """Completions-form logprobs as OpenAI defines them for `/v1/completions` clients: tokens
    as text, `top_logprobs` dicts keyed by text (two ids that decode alike share a key, the
    higher logprob kept), `text_offset` from `offset`; and the offset after the last token."""
    if not lp:
        return None, offset
    tokens, offsets, tops = [], [], []
    for name in lp.get("tokens") or []:
        text = _text(str(name), vocab)[0]
        tokens.append(str(name) if as_ids else text)
        offsets.append(offset)
        offset += len(text)
    for top in lp.get("top_logprobs") or []:
        out: dict[str, float] = {}
        for name, v in (top or {}).items():
            key = name if as_ids else _text(name, vocab)[0]
            if key not in out or v > out[key]:
                out[key] = v
        tops.append(out)
    return ({"tokens": tokens, "token_logprobs": list(lp.get("token_logprobs") or []),
             "top_logprobs": tops, "text_offset": offsets}, offset)


def _merge_logprobs(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    if not parts:
        return None
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                 "text_offset": []}
    for p in parts:
        for key in out:
            out[key].extend(p.get(key) or [])
    return out


class Shaper:
    """Builds the client's chunks and bodies for one request."""

    def __init__(self, req: ApiRequest, created: int | None = None,
                 vocab: TokenVocab | None = None) -> None:
        """`vocab`: the model's tokenizer, to name and measure `token_id:<id>` logprobs."""
        self.req = req
        self.chat = req.endpoint is Endpoint.CHAT
        self.vocab = vocab
        body = req.body
        self.top_n = (body.top_logprobs or 0) if isinstance(body, ChatRequest) else 0
        self.as_ids = body.extra.get("return_tokens_as_token_ids") is True
        self._offsets: dict[int, int] = {}
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + req.request_id
        self.created = int(time.time()) if created is None else created
        self.model = req.body.model
        self._chunk_object = "chat.completion.chunk" if self.chat else "text_completion"
        self._role_sent: set[int] = set()
        self._head = b""  # a chunk's envelope but its choice, encoded at the first chunk

    def _envelope(self, choices: list[dict[str, Any]], usage: Any = None) -> dict[str, Any]:
        out = {"id": self.id, "object": self._chunk_object, "created": self.created,
               "model": self.model, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def chunk(self, index: int, d: Delta) -> bytes:
        if self.chat:
            delta: dict[str, Any] = {"content": d.text}
            if index not in self._role_sent:
                self._role_sent.add(index)
                delta = {"role": "assistant", "content": d.text}
            lp = None if d.logprobs is None else chat_logprobs(d.logprobs, self.top_n,
                                                              self.vocab, self.as_ids)
            choice = {"index": index, "delta": delta, "logprobs": lp,
                      "finish_reason": d.finish_reason}
        else:
            if d.logprobs is None:
                lp = None
            else:
                lp, self._offsets[index] = completion_logprobs(
                    d.logprobs, self.vocab, self._offsets.get(index, 0), self.as_ids)
            choice = {"index": index, "text": d.text, "logprobs": lp,
                      "finish_reason": d.finish_reason}
        if d.note is not None:
            choice["meshd"] = {"halted": d.note}
        head = self._head
        if not head:  # a chunk is head + choice + tail, the head encoded once per request
            head = self._head = orjson.dumps(
                {"id": self.id, "object": self._chunk_object, "created": self.created,
                 "model": self.model})[:-1] + b',"choices":['
        return head + orjson.dumps(choice) + b"]}"

    def usage_chunk(self, usage: dict[str, Any]) -> bytes:
        return orjson.dumps(self._envelope([], usage))

    def meshd_chunk(self, meshd: dict[str, Any]) -> bytes:
        """A chunk with no choices carrying meshd's own fields (a receipt)."""
        return orjson.dumps({**self._envelope([]), "meshd": meshd})

    def body(self, outputs: Sequence[ChoiceOutput], usage: dict[str, Any],
             meshd: dict[str, Any] | None = None) -> bytes:
        choices = []
        for i, o in enumerate(outputs):
            text = "".join(o.text)
            lp = _merge_logprobs(o.logprobs)
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": chat_logprobs(lp, self.top_n, self.vocab,
                                                          self.as_ids),
                                "finish_reason": o.finish_reason})
            else:
                choices.append({"index": i, "text": text, "logprobs": completion_logprobs(
                    lp, self.vocab, 0, self.as_ids)[0], "finish_reason": o.finish_reason})
        for c, o in zip(choices, outputs, strict=True):
            if o.note is not None:
                c["meshd"] = {"halted": o.note}
        obj = "chat.completion" if self.chat else "text_completion"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
               "choices": choices, "usage": usage}
        if meshd is not None:
            out["meshd"] = meshd
        return orjson.dumps(out)


def usage(prompt_tokens: int, outputs: Sequence[ChoiceOutput]) -> dict[str, Any]:
    completion = sum(len(o.token_ids) for o in outputs)
    cached = max((o.cached_tokens for o in outputs), default=0)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}
