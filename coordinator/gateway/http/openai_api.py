"""Validation of OpenAI chat/completions bodies into typed, frozen requests.

`parse_chat(obj, limits)` and `parse_completion(obj, limits)` take the decoded JSON body (a dict;
not mutated, not copied) and return `ChatRequest` / `CompletionRequest`, or raise `ApiError`
(400, `param` naming the field). Fields we do not know are kept in `extra` for the engines;
`tools`, `tool_choice` and `response_format` are type-checked at the top level only and passed
through untouched. The original body bytes are kept by the server in `ApiRequest.raw`.

What this accepts is a subset of what every worker accepts (vLLM's OpenAI server and the
embedded engine's `openai_io.parse_request`), field by field, including the vLLM fields kept in
`extra` that are forwarded to workers as sent (`_check_forwarded`), so a worker's 4xx is never
the gateway's oversight. What only the served model can decide (context length, token ids past
the vocabulary) stays the worker's to refuse. `tests/coordinator/gateway/http/
test_accepted_subset.py` holds the two front ends to this, boundary value by boundary value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from meshd.coordinator.gateway.config import Limits
from meshd.coordinator.gateway.http.errors import invalid
from meshd.coordinator.gateway.http.fields import (
    TOKEN_ID_MAX,
    logit_bias,
    opt_bool,
    opt_float,
    opt_int,
    opt_str,
    stop,
    token_ids,
)
from meshd.seeds import SEED_MAX, SEED_MIN, UNSEEDED

ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})
_EMPTY: dict[str, Any] = {}


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message. `content` is the text (text parts joined with newlines) or None."""

    role: str
    content: str | None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: Any = None


@dataclass(frozen=True, slots=True)
class Sampling:
    """Sampling fields shared by both endpoints. `max_tokens` is max_completion_tokens if set."""

    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    messages: tuple[ChatMessage, ...]
    stream: bool
    include_usage: bool
    sampling: Sampling
    logprobs: bool
    top_logprobs: int | None
    user: str | None
    tools: Any
    tool_choice: Any
    response_format: Any
    extra: dict[str, Any]
    # The structured conversation (`dialects.model.Conversation`): every /v1/messages and
    # /v1/responses request, and a chat request with tools or a tool-call chain; the prompt is
    # then rendered from it, tools included. None: the plain `messages` are the prompt.
    conversation: Any = None
    prefill: str = ""  # Anthropic: the final assistant turn's text, continued by the model


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    model: str
    prompt: str | tuple[int, ...]
    stream: bool
    include_usage: bool
    sampling: Sampling
    logprobs: int | None
    user: str | None
    extra: dict[str, Any]


_COMMON = frozenset({"model", "stream", "stream_options", "n", "stop", "seed", "temperature",
                     "top_p", "max_tokens", "user"})
_CHAT_KNOWN = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs",
                         "tools", "tool_choice", "response_format", "parallel_tool_calls"}
_COMPLETION_KNOWN = _COMMON | {"prompt", "logprobs"}


def _model(obj: dict[str, Any]) -> str:
    m = obj.get("model")
    if type(m) is not str or not m:
        raise invalid("'model' is required and must be a non-empty string.", "model")
    return m


def _response_format(rf: object) -> None:
    """`response_format` is {"type": "text"}, {"type": "json_object"} or {"type":
    "json_schema", "json_schema": {"name": ..., "schema": {...}, ...}} (the workers that
    enforce it check the schema itself)."""
    if type(rf) is not dict:
        raise invalid("'response_format' must be an object.", "response_format")
    kind = rf.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise invalid("'response_format.type' must be one of text, json_object, json_schema.",
                      "response_format.type")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if type(js) is not dict or type(js.get("name")) is not str or not js["name"]:
            raise invalid("'response_format.json_schema' must be an object with a 'name'.",
                          "response_format.json_schema")
        if "schema" in js and type(js["schema"]) is not dict:
            raise invalid("'response_format.json_schema.schema' must be an object.",
                          "response_format.json_schema.schema")


def _stream(obj: dict[str, Any]) -> tuple[bool, bool]:
    stream = opt_bool(obj, "stream")
    so = obj.get("stream_options")
    if so is None:
        return stream, False
    if not stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true.",
                      "stream_options")
    if type(so) is not dict:
        raise invalid("'stream_options' must be an object.", "stream_options")
    iu = so.get("include_usage")
    if iu is not None and type(iu) is not bool:
        raise invalid("'stream_options.include_usage' must be a boolean.",
                      "stream_options.include_usage")
    return stream, bool(iu)


def _sampling(obj: dict[str, Any], lim: Limits, chat: bool) -> Sampling:
    max_tokens = opt_int(obj, "max_tokens", 1, lim.max_tokens)
    if chat:
        mct = opt_int(obj, "max_completion_tokens", 1, lim.max_tokens)
        if mct is not None:
            max_tokens = mct
    seed = opt_int(obj, "seed", SEED_MIN, SEED_MAX)  # vLLM: torch.long; the engine: int64
    return Sampling(
        n=opt_int(obj, "n", 1, lim.max_n) or 1,
        stop=stop(obj, lim.max_stop),
        seed=None if seed == UNSEEDED else seed,
        temperature=opt_float(obj, "temperature", 0.0, 2.0),
        top_p=opt_float(obj, "top_p", 0.0, 1.0, lo_open=True),
        max_tokens=max_tokens,
    )


def _check_forwarded(obj: dict[str, Any], lim: Limits, max_tokens: int | None) -> None:
    """vLLM sampling fields the gateway passes to workers as sent (they stay in `extra`):
    refused here in the ranges vLLM refuses them (`vllm/sampling_params.py` `_verify_args`)."""
    opt_int(obj, "top_k", -1, TOKEN_ID_MAX)  # -1 or 0: off
    opt_float(obj, "min_p", 0.0, 1.0)
    opt_float(obj, "presence_penalty", -2.0, 2.0)
    opt_float(obj, "frequency_penalty", -2.0, 2.0)
    opt_float(obj, "repetition_penalty", 0.0, math.inf, lo_open=True)
    min_tokens = opt_int(obj, "min_tokens", 0, lim.max_tokens)
    if min_tokens and max_tokens is not None and min_tokens > max_tokens:
        raise invalid(f"'min_tokens' ({min_tokens}) must not exceed the maximum number of "
                      f"tokens ({max_tokens}).", "min_tokens")
    token_ids(obj, "stop_token_ids")
    logit_bias(obj)
    for key in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
                "return_token_ids", "return_tokens_as_token_ids", "echo"):
        opt_bool(obj, key)


def _content(v: object, i: int) -> str | None:
    if v is None or type(v) is str:
        return v
    param = f"messages[{i}].content"
    if type(v) is not list:
        raise invalid(f"'{param}' must be a string or a list of content parts.", param)
    texts = []
    for j, part in enumerate(v):
        if type(part) is not dict or part.get("type") != "text":
            raise invalid(f"'{param}[{j}]' must be a text part "
                          "({\"type\": \"text\", \"text\": ...}); only text is supported.",
                          f"{param}[{j}]")
        t = part.get("text")
        if type(t) is not str:
            raise invalid(f"'{param}[{j}].text' must be a string.", f"{param}[{j}].text")
        texts.append(t)
    return "\n".join(texts)


def _message(m: object, i: int) -> ChatMessage:
    if type(m) is not dict:
        raise invalid(f"'messages[{i}]' must be an object.", f"messages[{i}]")
    role = m.get("role")
    if role not in ROLES:
        raise invalid(f"'messages[{i}].role' must be one of {sorted(ROLES)}, got {role!r}.",
                      f"messages[{i}].role")
    content = _content(m.get("content"), i)
    tool_calls = m.get("tool_calls")
    if content is None and not (role == "assistant" and tool_calls):
        raise invalid(f"'messages[{i}].content' is required.", f"messages[{i}].content")
    name, tcid = m.get("name"), m.get("tool_call_id")
    if name is not None and type(name) is not str:
        raise invalid(f"'messages[{i}].name' must be a string.", f"messages[{i}].name")
    if role == "tool" and type(tcid) is not str:
        raise invalid(f"'messages[{i}].tool_call_id' is required for role 'tool'.",
                      f"messages[{i}].tool_call_id")
    return ChatMessage(role, content, name, tcid, tool_calls)


def _extra(obj: dict[str, Any], known: frozenset[str]) -> dict[str, Any]:
    """Fields the gateway does not interpret, for the engines. Shared empty dict when none."""
    return {k: v for k, v in obj.items() if k not in known} or _EMPTY


def _require_object(obj: object) -> dict[str, Any]:
    if type(obj) is not dict:
        raise invalid("The request body must be a JSON object.")
    return obj


def parse_chat(obj: object, lim: Limits) -> ChatRequest:
    """Validate a /v1/chat/completions body. Raises ApiError(400) naming the field."""
    body = _require_object(obj)
    model = _model(body)
    msgs = body.get("messages")
    if type(msgs) is not list or not msgs:
        raise invalid("'messages' must be a non-empty list.", "messages")
    stream, include_usage = _stream(body)
    logprobs = opt_bool(body, "logprobs")
    top = opt_int(body, "top_logprobs", 0, lim.max_logprobs)
    if top is not None and not logprobs:
        raise invalid("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
    tools, tool_choice, rf = body.get("tools"), body.get("tool_choice"), body.get("response_format")
    if tools is not None and type(tools) is not list:
        raise invalid("'tools' must be a list.", "tools")
    if tool_choice is not None and type(tool_choice) not in (str, dict):
        raise invalid("'tool_choice' must be a string or an object.", "tool_choice")
    if rf is not None:
        _response_format(rf)
    sampling = _sampling(body, lim, True)
    _check_forwarded(body, lim, sampling.max_tokens)
    messages = tuple(_message(m, i) for i, m in enumerate(msgs))
    conv = None
    if tools or any(m.tool_calls or m.role in ("tool", "function") for m in messages):
        from meshd.coordinator.gateway.dialects.openai_chat import conversation_from_chat

        conv = conversation_from_chat(msgs, tools, tool_choice, body.get("parallel_tool_calls"))
    return ChatRequest(
        model=model, messages=messages,
        stream=stream, include_usage=include_usage, sampling=sampling,
        logprobs=logprobs, top_logprobs=top, user=opt_str(body, "user"), tools=tools,
        tool_choice=tool_choice, response_format=rf,
        extra=_extra(body, _CHAT_KNOWN), conversation=conv)


def _prompt(v: object, lim: Limits) -> str | tuple[int, ...]:
    if type(v) is str and v:
        return v
    if type(v) is list and v:
        if all(type(t) is int and 0 <= t <= TOKEN_ID_MAX for t in v):
            if len(v) > lim.max_prompt_tokens:
                raise invalid(f"'prompt' exceeds {lim.max_prompt_tokens} tokens.", "prompt")
            return tuple(v)
        if all(type(t) is str for t in v):
            raise invalid("Batched prompts (a list of strings) are not supported; send one "
                          "request per prompt.", "prompt")
    raise invalid("'prompt' must be a non-empty string or a non-empty list of token ids "
                  "(integers in [0, 2^31)).", "prompt")


def parse_completion(obj: object, lim: Limits) -> CompletionRequest:
    """Validate a /v1/completions body. Raises ApiError(400) naming the field."""
    body = _require_object(obj)
    model = _model(body)
    if "prompt" not in body:
        raise invalid("'prompt' is required.", "prompt")
    prompt = _prompt(body["prompt"], lim)
    stream, include_usage = _stream(body)
    sampling = _sampling(body, lim, False)
    _check_forwarded(body, lim, sampling.max_tokens)
    return CompletionRequest(
        model=model, prompt=prompt, stream=stream, include_usage=include_usage,
        sampling=sampling, logprobs=opt_int(body, "logprobs", 0, lim.max_logprobs),
        user=opt_str(body, "user"), extra=_extra(body, _COMPLETION_KNOWN))

