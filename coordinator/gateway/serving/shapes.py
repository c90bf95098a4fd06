"""Response shapes: worker completion chunks in, OpenAI chat/completion responses out.

The gateway always talks to workers through `/v1/completions` with token-id prompts and
`return_token_ids`, and builds the client's response itself, so a request can move between
workers mid-stream without the client seeing a seam. `Delta` is one worker chunk's worth of
one choice; logprobs are kept in completions form and converted for chat.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from meshd.coordinator.gateway.http.api_request import ApiRequest, Endpoint


@dataclass(slots=True)
class Delta:
    text: str
    token_ids: list[int]
    logprobs: dict[str, Any] | None  # completions form: tokens, token_logprobs, top_logprobs
    finish_reason: str | None
    stop_reason: int | str | None = None


def parse_delta(choice: Mapping[str, Any]) -> Delta:
    """One choice of a worker's completion chunk (or full response)."""
    return Delta(text=str(choice.get("text") or ""), token_ids=list(choice.get("token_ids") or ()),
                 logprobs=choice.get("logprobs"), finish_reason=choice.get("finish_reason"),
                 stop_reason=choice.get("stop_reason"))


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


def _chat_logprobs(lp: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not lp:
        return None
    content = []
    tops = lp.get("top_logprobs") or []
    for i, (tok, val) in enumerate(zip(lp.get("tokens") or [], lp.get("token_logprobs") or [],
                                       strict=False)):
        top = tops[i] if i < len(tops) and tops[i] else {}
        content.append({"token": tok, "logprob": val, "bytes": list(str(tok).encode()),
                        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                         for t, v in top.items()]})
    return {"content": content}


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

    def __init__(self, req: ApiRequest, created: int | None = None) -> None:
        self.req = req
        self.chat = req.endpoint is Endpoint.CHAT
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + req.request_id
        self.created = int(time.time()) if created is None else created
        self.model = req.body.model
        self._chunk_object = "chat.completion.chunk" if self.chat else "text_completion"
        self._role_sent: set[int] = set()

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
            choice = {"index": index, "delta": delta, "logprobs": _chat_logprobs(d.logprobs),
                      "finish_reason": d.finish_reason}
        else:
            choice = {"index": index, "text": d.text, "logprobs": d.logprobs,
                      "finish_reason": d.finish_reason}
        return orjson.dumps(self._envelope([choice]))

    def usage_chunk(self, usage: dict[str, Any]) -> bytes:
        return orjson.dumps(self._envelope([], usage))

    def body(self, outputs: Sequence[ChoiceOutput], usage: dict[str, Any]) -> bytes:
        choices = []
        for i, o in enumerate(outputs):
            text = "".join(o.text)
            lp = _merge_logprobs(o.logprobs)
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": _chat_logprobs(lp), "finish_reason": o.finish_reason})
            else:
                choices.append({"index": i, "text": text, "logprobs": lp,
                                "finish_reason": o.finish_reason})
        obj = "chat.completion" if self.chat else "text_completion"
        return orjson.dumps({"id": self.id, "object": obj, "created": self.created,
                             "model": self.model, "choices": choices, "usage": usage})


def usage(prompt_tokens: int, outputs: Sequence[ChoiceOutput]) -> dict[str, Any]:
    completion = sum(len(o.token_ids) for o in outputs)
    cached = max((o.cached_tokens for o in outputs), default=0)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}
