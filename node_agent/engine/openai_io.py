"""OpenAI request parsing and response shapes for the worker server (vLLM's subset).

`parse_request` turns a decoded JSON body (`meshd.api_errors.loads_body`, the gateway's decoder
too) into a typed `ParsedRequest` or raises `ApiError` (an OpenAI-shaped 400 naming the field);
it never lets a TypeError or KeyError through. Ranges are vLLM's where the engine has the field
(`vllm/sampling_params.py`), so the gateway, which accepts a subset of both, never sends what
the engine refuses; `presence_penalty`, `frequency_penalty`, `repetition_penalty` and `min_p`
are checked like vLLM's but not applied by this engine. The `logprobs_*` helpers build the
logprobs of `/v1/completions` and `/v1/chat/completions` responses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from meshd.api_errors import invalid
from meshd.node_agent.engine.api import SamplingParams, TokenLogprob
from meshd.node_agent.engine.tokenizer import Tokenizer
from meshd.seeds import SEED_MAX, SEED_MIN, UNSEEDED

MAX_N = 128
MAX_LOGPROBS = 20
_INT_LIMIT = 1 << 31


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
    # vLLM extension: logprobs name tokens "token_id:<id>", so tokens that decode alike differ
    return_tokens_as_token_ids: bool = False
    # meshd extension: sign what each choice produced with the node's key (receipts)
    meshd_attest: bool = False


_MISSING = object()


def _field(body: dict[str, Any], name: str, types: type | tuple[type, ...], default: Any,
           what: str) -> Any:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    bad_bool = isinstance(value, bool) and bool not in (types if isinstance(types, tuple)
                                                        else (types,))
    if not isinstance(value, types) or bad_bool:
        raise invalid(f"'{name}' must be {what}, got {type(value).__name__}", param=name)
    return value


def _int(body: dict[str, Any], name: str, default: int | None, lo: int, hi: int) -> int | None:
    v = _field(body, name, int, default, "an integer")
    if v is not None and not lo <= v <= hi:
        raise invalid(f"'{name}' must be in {lo}..{hi}, got {v}", param=name)
    return v


def _float(body: dict[str, Any], name: str, default: float, lo: float, hi: float,
           lo_open: bool = False) -> float:
    """A number in [lo, hi], or (lo, hi] with `lo_open`. Never NaN or infinite: the body
    decoder refuses those, and an integer too large for a double is refused here."""
    v = _field(body, name, (int, float), default, "a number")
    if v > hi or v < lo or (lo_open and v == lo):
        raise invalid(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}",
                      param=name)
    return float(v)


def _prompt_ids(body: dict[str, Any], chat: bool, info: ModelInfo) -> tuple[int, ...]:
    tok = info.tokenizer
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise invalid("'messages' must be a non-empty list", param="messages")
        flat = []
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise invalid("each message must be an object with a 'role'", param="messages")
            flat.append({"role": m["role"], "content": _content(m.get("content"))})
        try:
            return tuple(tok.apply_chat_template(flat, add_generation_prompt=True))
        except ValueError as e:
            raise invalid(str(e), param="messages") from None
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
        p = p[0]  # a batch of one
    if isinstance(p, str) and p:
        return tuple(tok.encode(p))
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                         for t in p):
        if min(p) < 0 or max(p) >= info.vocab_size:
            raise invalid(f"token ids must be in 0..{info.vocab_size - 1}", param="prompt")
        return tuple(p)
    raise invalid("'prompt' must be a non-empty string or list of token ids (one prompt)",
                  param="prompt")


def _content(c: Any) -> str:
    if c is None or isinstance(c, str):
        return c or ""
    if isinstance(c, list) and all(isinstance(x, dict) and x.get("type") == "text"
                                   and isinstance(x.get("text"), str) for x in c):
        return "\n".join(x["text"] for x in c)  # as vLLM (and the gateway) join text parts
    raise invalid("message 'content' must be a string or a list of text parts",
                  param="messages")


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    s = body.get("stop")
    if s is None:
        return ()
    if isinstance(s, str):
        s = [s]
    if not isinstance(s, list) or not all(isinstance(x, str) for x in s):
        raise invalid("'stop' must be a string or a list of strings", param="stop")
    if not all(s):
        raise invalid("'stop' must not contain an empty string", param="stop")
    return tuple(s)


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    if not chat:
        return _int(body, "logprobs", None, 0, MAX_LOGPROBS)
    want = _field(body, "logprobs", bool, False, "a boolean")
    top = _int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not want:
        raise invalid("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return (top or 0) if want else None


def _max_tokens(body: dict[str, Any], chat: bool, info: ModelInfo,
                prompt: tuple[int, ...]) -> int:
    """The request's output cap: `max_completion_tokens` (chat) or `max_tokens`, or what fits."""
    if len(prompt) >= info.max_model_len:
        raise invalid(f"This model's maximum context length is {info.max_model_len} tokens; "
                      f"the prompt has {len(prompt)} tokens", param="messages" if chat
                      else "prompt", code="context_length_exceeded")
    room = min(info.max_model_len, info.kv_capacity_tokens) - len(prompt)
    max_tokens = _int(body, "max_tokens", None, -_INT_LIMIT, _INT_LIMIT)
    mct = _int(body, "max_completion_tokens", None, -_INT_LIMIT, _INT_LIMIT) if chat else None
    name = "max_completion_tokens" if mct is not None else "max_tokens"
    max_tokens = mct if mct is not None else max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise invalid(f"'{name}' must be at least 1, got {max_tokens}", param=name)
    if max_tokens is not None and max_tokens > room:
        raise invalid(f"This model's maximum context length is {info.max_model_len} tokens "
                      f"(KV cache: {info.kv_capacity_tokens}); you requested {max_tokens} "
                      f"output tokens for a {len(prompt)}-token prompt", param=name,
                      code="context_length_exceeded")
    if room < 1:
        raise invalid(f"the prompt has {len(prompt)} tokens; the KV cache holds "
                      f"{info.kv_capacity_tokens}", code="context_length_exceeded")
    return max_tokens or room


def _unapplied(body: dict[str, Any]) -> None:
    """vLLM sampling fields this engine does not apply: checked as vLLM checks them."""
    _float(body, "presence_penalty", 0.0, -2.0, 2.0)
    _float(body, "frequency_penalty", 0.0, -2.0, 2.0)
    _float(body, "repetition_penalty", 1.0, 0.0, float("inf"), lo_open=True)
    _float(body, "min_p", 0.0, 0.0, 1.0)
    if _int(body, "min_tokens", 0, 0, _INT_LIMIT):
        raise invalid("'min_tokens' is not supported by this engine", param="min_tokens")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise invalid("'response_format' other than {\"type\": \"text\"} is not supported by "
                      "this engine: it does not constrain its output to JSON or a schema "
                      "(serve the model with vLLM for structured output)",
                      param="response_format")
    for name in ("structured_outputs", "guided_json", "guided_regex", "guided_choice",
                 "guided_grammar"):
        if body.get(name) is not None:
            raise invalid(f"'{name}' is not supported by this engine: it does not constrain "
                          f"its output", param=name)


def _sampling(body: dict[str, Any], chat: bool, max_tokens: int) -> SamplingParams:
    stop_ids = _field(body, "stop_token_ids", list, [], "a list of token ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise invalid("'stop_token_ids' must be a list of integers", param="stop_token_ids")
    seed = _int(body, "seed", None, SEED_MIN, SEED_MAX)  # vLLM: torch.long
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=_float(body, "temperature", 1.0, 0.0, 100.0),
            top_p=_float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            top_k=_int(body, "top_k", 0, -1, _INT_LIMIT) or 0,
            seed=None if seed == UNSEEDED else seed,
            stop=_stops(body), stop_token_ids=tuple(stop_ids),
            ignore_eos=_field(body, "ignore_eos", bool, False, "a boolean"),
            logprobs=_logprobs(body, chat),
            include_stop_str_in_output=_field(body, "include_stop_str_in_output", bool, False,
                                              "a boolean"),
            confidence=_field(body, "meshd_confidence", bool, False, "a boolean"))
    except ValueError as e:
        raise invalid(str(e)) from None


def parse_request(body: Any, chat: bool, info: ModelInfo) -> ParsedRequest:
    """Validate an OpenAI completions/chat body against the served model."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = _field(body, "model", str, info.name, "a string")
    if model != info.name:
        raise invalid(f"The model `{model}` does not exist; this server serves "
                      f"`{info.name}`", param="model", code="model_not_found")
    prompt = _prompt_ids(body, chat, info)
    max_tokens = _max_tokens(body, chat, info, prompt)
    _unapplied(body)
    stream = _field(body, "stream", bool, False, "a boolean")
    opts = _field(body, "stream_options", dict, {}, "an object")
    if opts and not stream:
        raise invalid("'stream_options' needs 'stream': true", param="stream_options")
    include_usage = _field(opts, "include_usage", bool, False, "a boolean")
    kvp = _field(body, "kv_transfer_params", dict, None, "an object")
    sampling = _sampling(body, chat, max_tokens)
    return ParsedRequest(
        chat, prompt, sampling, int(_int(body, "n", 1, 1, MAX_N) or 1), stream, include_usage,
        kvp, _field(body, "return_token_ids", bool, False, "a boolean"),
        _field(body, "return_tokens_as_token_ids", bool, False, "a boolean"),
        _field(body, "meshd_attest", bool, False, "a boolean"))


# -- responses -------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _name(tok: Tokenizer, token_id: int, as_ids: bool) -> str:
    """How a logprobs entry names a token: its text, or vLLM's `token_id:<id>`."""
    return f"token_id:{token_id}" if as_ids else tok.decode([token_id])


def logprobs_chat(tok: Tokenizer, lps: Sequence[TokenLogprob],
                  as_ids: bool = False) -> dict[str, Any]:
    """Chat shape: `{"content": [{token, logprob, bytes, top_logprobs: [...]}]}`; `bytes` are
    the token's own bytes (`Tokenizer.token_bytes`), whole even when it is partial UTF-8."""
    def entry(tid: int, lp: float) -> dict[str, Any]:
        return {"token": _name(tok, tid, as_ids), "logprob": lp,
                "bytes": list(tok.token_bytes(tid))}

    return {"content": [{**entry(x.token_id, x.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in x.top]} for x in lps],
            "refusal": None}


def logprobs_completion(tok: Tokenizer, lps: Sequence[TokenLogprob], offset: int = 0,
                        as_ids: bool = False) -> tuple[dict[str, Any], int]:
    """Completions shape: parallel lists `tokens`, `token_logprobs`, `top_logprobs` (dicts of
    token -> logprob, the sampled token included; tokens that decode alike share one key unless
    `as_ids`), `text_offset` (from `offset`, in characters
    of the decoded text whatever `as_ids`); and the offset after the last token."""
    tokens, offsets = [], []
    for x in lps:
        tokens.append(_name(tok, x.token_id, as_ids))
        offsets.append(offset)
        offset += len(tok.decode([x.token_id]))
    tops = []
    for x in lps:
        top: dict[str, float] = {}
        for t, lp in (*x.top, (x.token_id, x.logprob)):  # names alike: the likeliest's logprob
            name = _name(tok, t, as_ids)
            top[name] = max(lp, top.get(name, lp))
        tops.append(top)
    return ({"tokens": tokens, "token_logprobs": [x.logprob for x in lps], "top_logprobs": tops,
             "text_offset": offsets}, offset)
