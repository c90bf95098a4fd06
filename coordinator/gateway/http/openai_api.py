"""Validation of OpenAI chat/completions bodies into typed, frozen requests.

`parse_chat(obj, limits)` and `parse_completion(obj, limits)` take the decoded JSON body (a dict;
not mutated, not copied) and return `ChatRequest` / `CompletionRequest`, or raise `ApiError`
(400, `param` naming the field). Fields we do not know are kept in `extra` for the engines;
`tools`, `tool_choice` and `response_format` are type-checked at the top level only and passed
through untouched. The original body bytes are kept by the server in `ApiRequest.raw`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshd.coordinator.gateway.config import Limits
from meshd.coordinator.gateway.http.errors import invalid

ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1
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
                         "tools", "tool_choice", "response_format"}
_COMPLETION_KNOWN = _COMMON | {"prompt", "logprobs"}


def _is_int(v: object) -> bool:
    return type(v) is int


def _is_num(v: object) -> bool:
    return type(v) is float or type(v) is int


def _opt_int(obj: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    v = obj.get(key)
    if v is None:
        return None
    if not _is_int(v):
        raise invalid(f"'{key}' must be an integer.", key)
    if not lo <= v <= hi:
        raise invalid(f"'{key}' must be between {lo} and {hi}, got {v}.", key)
    return int(v)


def _opt_str(obj: dict[str, Any], key: str) -> str | None:
    v = obj.get(key)
    if v is None or type(v) is str:
        return v
    raise invalid(f"'{key}' must be a string.", key)


def _opt_bool(obj: dict[str, Any], key: str) -> bool:
    v = obj.get(key)
    if v is None:
        return False
    if type(v) is not bool:
        raise invalid(f"'{key}' must be a boolean.", key)
    return v


def _model(obj: dict[str, Any]) -> str:
    m = obj.get("model")
    if type(m) is not str or not m:
        raise invalid("'model' is required and must be a non-empty string.", "model")
    return m


def _stream(obj: dict[str, Any]) -> tuple[bool, bool]:
    stream = _opt_bool(obj, "stream")
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


def _stop(obj: dict[str, Any], limit: int) -> tuple[str, ...]:
    v = obj.get("stop")
    if v is None:
        return ()
    if type(v) is str:
        return (v,)
    if type(v) is not list or any(type(s) is not str for s in v):
        raise invalid("'stop' must be a string or a list of strings.", "stop")
    if len(v) > limit:
        raise invalid(f"'stop' may hold at most {limit} sequences.", "stop")
    return tuple(v)


def _float(obj: dict[str, Any], key: str, lo: float, hi: float, lo_open: bool) -> float | None:
    v = obj.get(key)
    if v is None:
        return None
    if not _is_num(v):
        raise invalid(f"'{key}' must be a number.", key)
    if v > hi or v < lo or (lo_open and v == lo):
        lo_s = f"({lo}" if lo_open else f"[{lo}"
        raise invalid(f"'{key}' must be in {lo_s}, {hi}], got {v}.", key)
    return float(v)


def _sampling(obj: dict[str, Any], lim: Limits, chat: bool) -> Sampling:
    max_tokens = _opt_int(obj, "max_tokens", 1, lim.max_tokens)
    if chat:
        mct = _opt_int(obj, "max_completion_tokens", 1, lim.max_tokens)
        if mct is not None:
            max_tokens = mct
    return Sampling(
        n=_opt_int(obj, "n", 1, lim.max_n) or 1,
        stop=_stop(obj, lim.max_stop),
        seed=_opt_int(obj, "seed", _INT64_MIN, _UINT64_MAX),
        temperature=_float(obj, "temperature", 0.0, 2.0, False),
        top_p=_float(obj, "top_p", 0.0, 1.0, True),
        max_tokens=max_tokens,
    )


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
    logprobs = _opt_bool(body, "logprobs")
    top = _opt_int(body, "top_logprobs", 0, 20)
    if top is not None and not logprobs:
        raise invalid("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
    tools, tool_choice, rf = body.get("tools"), body.get("tool_choice"), body.get("response_format")
    if tools is not None and type(tools) is not list:
        raise invalid("'tools' must be a list.", "tools")
    if tool_choice is not None and type(tool_choice) not in (str, dict):
        raise invalid("'tool_choice' must be a string or an object.", "tool_choice")
    if rf is not None and type(rf) is not dict:
        raise invalid("'response_format' must be an object.", "response_format")
    return ChatRequest(
        model=model, messages=tuple(_message(m, i) for i, m in enumerate(msgs)),
        stream=stream, include_usage=include_usage, sampling=_sampling(body, lim, True),
        logprobs=logprobs, top_logprobs=top, user=_opt_str(body, "user"), tools=tools,
        tool_choice=tool_choice, response_format=rf, extra=_extra(body, _CHAT_KNOWN))


def _prompt(v: object, lim: Limits) -> str | tuple[int, ...]:
    if type(v) is str:
        return v
    if type(v) is list and v:
        if all(type(t) is int and 0 <= t < 2**31 for t in v):
            if len(v) > lim.max_prompt_tokens:
                raise invalid(f"'prompt' exceeds {lim.max_prompt_tokens} tokens.", "prompt")
            return tuple(v)
        if all(type(t) is str for t in v):
            raise invalid("Batched prompts (a list of strings) are not supported; send one "
                          "request per prompt.", "prompt")
    raise invalid("'prompt' must be a string or a non-empty list of token ids "
                  "(integers in [0, 2^31)).", "prompt")


def parse_completion(obj: object, lim: Limits) -> CompletionRequest:
    """Validate a /v1/completions body. Raises ApiError(400) naming the field."""
    body = _require_object(obj)
    model = _model(body)
    if "prompt" not in body:
        raise invalid("'prompt' is required.", "prompt")
    prompt = _prompt(body["prompt"], lim)
    stream, include_usage = _stream(body)
    return CompletionRequest(
        model=model, prompt=prompt, stream=stream, include_usage=include_usage,
        sampling=_sampling(body, lim, False), logprobs=_opt_int(body, "logprobs", 0, 5),
        user=_opt_str(body, "user"), extra=_extra(body, _COMPLETION_KNOWN))

