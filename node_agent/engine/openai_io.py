"""OpenAI request parsing and response shapes for the worker server (vLLM's subset).

`parse_request` turns a JSON body into a typed `ParsedRequest` or raises `APIError` (an
OpenAI-shaped 400 naming the field); it never lets a TypeError or KeyError through. The
`*_choice`, `*_chunk` and `logprobs_*` helpers build the response dicts for
`/v1/completions` and `/v1/chat/completions`, streaming and not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from meshd.node_agent.engine.api import SamplingParams, TokenLogprob
from meshd.node_agent.engine.tokenizer import Tokenizer

MAX_N = 16
MAX_LOGPROBS = 20


class APIError(Exception):
    """An error the client gets as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = (
            message, status, type, param, code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class ModelInfo(NamedTuple):
    """What request validation needs to know about the served model."""

    name: str
    tokenizer: Tokenizer
    max_model_len: int
    kv_capacity_tokens: int  # num_blocks * block_size
    vocab_size: int


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    chat: bool
    prompt: tuple[int, ...]
    sampling: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    kv_transfer_params: dict[str, Any] | None
    return_token_ids: bool = False  # vLLM extension: choices carry token_ids, prompt_token_ids


_MISSING = object()


def _field(body: dict[str, Any], name: str, types: type | tuple[type, ...], default: Any,
           what: str) -> Any:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    bad_bool = isinstance(value, bool) and bool not in (types if isinstance(types, tuple)
                                                        else (types,))
    if not isinstance(value, types) or bad_bool:
        raise APIError(f"'{name}' must be {what}, got {type(value).__name__}", param=name)
    return value


def _int(body: dict[str, Any], name: str, default: int | None, lo: int, hi: int) -> int | None:
    v = _field(body, name, int, default, "an integer")
    if v is not None and not lo <= v <= hi:
        raise APIError(f"'{name}' must be in {lo}..{hi}, got {v}", param=name)
    return v


def _float(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    v = float(_field(body, name, (int, float), default, "a number"))
    if not lo <= v <= hi:
        raise APIError(f"'{name}' must be in [{lo}, {hi}], got {v}", param=name)
    return v


def _prompt_ids(body: dict[str, Any], chat: bool, info: ModelInfo) -> tuple[int, ...]:
    tok = info.tokenizer
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise APIError("'messages' must be a non-empty list", param="messages")
        flat = []
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise APIError("each message must be an object with a 'role'", param="messages")
            flat.append({"role": m["role"], "content": _content(m.get("content"))})
        try:
            return tuple(tok.apply_chat_template(flat, add_generation_prompt=True))
        except ValueError as e:
            raise APIError(str(e), param="messages") from None
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
        p = p[0]  # a batch of one
    if isinstance(p, str) and p:
        return tuple(tok.encode(p))
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                         for t in p):
        if min(p) < 0 or max(p) >= info.vocab_size:
            raise APIError(f"token ids must be in 0..{info.vocab_size - 1}", param="prompt")
        return tuple(p)
    raise APIError("'prompt' must be a non-empty string or list of token ids (one prompt)",
                   param="prompt")


def _content(c: Any) -> str:
    if c is None or isinstance(c, str):
        return c or ""
    if isinstance(c, list) and all(isinstance(x, dict) and x.get("type") == "text"
                                   and isinstance(x.get("text"), str) for x in c):
        return "".join(x["text"] for x in c)
    raise APIError("message 'content' must be a string or a list of text parts",
                   param="messages")


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    s = body.get("stop")
    if s is None:
        return ()
    if isinstance(s, str):
        s = [s]
    if not isinstance(s, list) or not all(isinstance(x, str) and x for x in s):
        raise APIError("'stop' must be a non-empty string or a list of them", param="stop")
    return tuple(s)


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    if not chat:
        return _int(body, "logprobs", None, 0, MAX_LOGPROBS)
    want = _field(body, "logprobs", bool, False, "a boolean")
    top = _int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not want:
        raise APIError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return (top or 0) if want else None


def parse_request(body: Any, chat: bool, info: ModelInfo) -> ParsedRequest:
    """Validate an OpenAI completions/chat body against the served model."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    model = _field(body, "model", str, info.name, "a string")
    if model != info.name:
        raise APIError(f"The model `{model}` does not exist; this server serves "
                       f"`{info.name}`", param="model", code="model_not_found")
    prompt = _prompt_ids(body, chat, info)
    if len(prompt) >= info.max_model_len:
        raise APIError(f"This model's maximum context length is {info.max_model_len} tokens; "
                       f"the prompt has {len(prompt)} tokens", param="messages" if chat
                       else "prompt", code="context_length_exceeded")
    room = min(info.max_model_len, info.kv_capacity_tokens) - len(prompt)
    limit = 1 << 31
    max_tokens = _int(body, "max_tokens", None, -limit, limit)
    mct = _int(body, "max_completion_tokens", None, -limit, limit)
    name = "max_completion_tokens" if mct is not None else "max_tokens"
    max_tokens = mct if mct is not None else max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise APIError(f"'{name}' must be at least 1, got {max_tokens}", param=name)
    if max_tokens is not None and max_tokens > room:
        raise APIError(f"This model's maximum context length is {info.max_model_len} tokens "
                       f"(KV cache: {info.kv_capacity_tokens}); you requested {max_tokens} "
                       f"output tokens for a {len(prompt)}-token prompt", param=name,
                       code="context_length_exceeded")
    if room < 1:
        raise APIError(f"the prompt has {len(prompt)} tokens; the KV cache holds "
                       f"{info.kv_capacity_tokens}", code="context_length_exceeded")
    if _int(body, "min_tokens", 0, 0, limit):
        raise APIError("'min_tokens' is not supported by this engine", param="min_tokens")
    stream = _field(body, "stream", bool, False, "a boolean")
    opts = _field(body, "stream_options", dict, {}, "an object")
    if opts and not stream:
        raise APIError("'stream_options' needs 'stream': true", param="stream_options")
    include_usage = _field(opts, "include_usage", bool, False, "a boolean")
    stop_ids = _field(body, "stop_token_ids", list, [], "a list of token ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise APIError("'stop_token_ids' must be a list of integers", param="stop_token_ids")
    kvp = _field(body, "kv_transfer_params", dict, None, "an object")
    try:
        sampling = SamplingParams(
            max_tokens=max_tokens or room,
            temperature=_float(body, "temperature", 1.0, 0.0, 100.0),
            top_p=_float(body, "top_p", 1.0, 1e-9, 1.0),
            top_k=_int(body, "top_k", 0, -1, limit) or 0,
            seed=_int(body, "seed", None, -(1 << 63), (1 << 63) - 1),
            stop=_stops(body), stop_token_ids=tuple(stop_ids),
            ignore_eos=_field(body, "ignore_eos", bool, False, "a boolean"),
            logprobs=_logprobs(body, chat),
            include_stop_str_in_output=_field(body, "include_stop_str_in_output", bool, False,
                                              "a boolean"))
    except ValueError as e:
        raise APIError(str(e)) from None
    return ParsedRequest(chat, prompt, sampling, int(_int(body, "n", 1, 1, MAX_N) or 1),
                         stream, include_usage, kvp,
                         _field(body, "return_token_ids", bool, False, "a boolean"))


# -- responses -------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _tok(tok: Tokenizer, token_id: int) -> str:
    return tok.decode([token_id])


def logprobs_chat(tok: Tokenizer, lps: Sequence[TokenLogprob]) -> dict[str, Any]:
    """Chat shape: `{"content": [{token, logprob, bytes, top_logprobs: [...]}]}`."""
    def entry(tid: int, lp: float) -> dict[str, Any]:
        s = _tok(tok, tid)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    return {"content": [{**entry(x.token_id, x.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in x.top]} for x in lps],
            "refusal": None}


def logprobs_completion(tok: Tokenizer, lps: Sequence[TokenLogprob],
                        offset: int = 0) -> dict[str, Any]:
    """Completions shape: parallel lists `tokens`, `token_logprobs`, `top_logprobs` (dicts of
    token -> logprob, the sampled token included), `text_offset` (from `offset`)."""
    tokens, offsets = [], []
    for x in lps:
        s = _tok(tok, x.token_id)
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
    tops = []
    for x, s in zip(lps, tokens, strict=True):
        top = {_tok(tok, t): lp for t, lp in x.top}
        top.setdefault(s, x.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [x.logprob for x in lps], "top_logprobs": tops,
            "text_offset": offsets}
