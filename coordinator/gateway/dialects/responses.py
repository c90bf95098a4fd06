"""Validation of OpenAI Responses bodies (`POST /v1/responses`) into `ResponsesRequest`.

`parse_responses_request(obj, limits)` raises `ApiError(400)` naming the field (`input[3].
call_id`). `input` is a string (one user message) or items: messages (`type: "message"` or the
short `{role, content}`; content a string or `input_text`/`output_text` parts), `function_call`,
`function_call_output` (output a string or `input_text` parts), `reasoning` (its
`reasoning_text` content, else its summary, is the text; `encrypted_content` the signature;
one with neither is dropped). Consecutive assistant-side items (reasoning, assistant messages,
function calls) form one assistant turn. Item `id`/`status`/`annotations` are ignored; other
item types, non-function tools and media parts are refused. Unknown top-level fields are
refused, listing them (`parallel_tool_calls` is accepted beyond the brief's list).

`previous_response_id`: the conversation is built from `input` alone with `open_start` (its
first turn may answer calls of the stored response; its system messages are system turns), and
the caller joins it to the stored one with `continue_conversation`, which checks the join.
`instructions` are kept apart, as OpenAI keeps them (never carried to the next response):
the model sees `with_instructions(history, req.instructions)`; the store keeps
`conversation_after(history, completion)`.

meshd extensions, as in `openai_chat`: `cache_control` on parts, `function_call` and
`function_call_output` items and tools; `is_error` on `function_call_output`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from meshd.api_errors import invalid
from meshd.coordinator.gateway.dialects.chain import ChainText, TurnBuilder
from meshd.coordinator.gateway.dialects.fields import (
    cache_hint,
    checked_choice,
    json_object_text,
    list_at,
    obj_at,
    opt_bool,
    opt_float,
    opt_int,
    opt_str,
    refuse_unknown,
    schema_text,
    str_at,
    text_parts,
    tool_name,
    unique_tools,
)
from meshd.coordinator.gateway.dialects.model import (
    ChoiceMode,
    Completion,
    Conversation,
    Reasoning,
    Text,
    ToolCall,
    ToolChoice,
    ToolResult,
    ToolSpec,
    Turn,
    completion_turn,
)

if TYPE_CHECKING:
    from meshd.coordinator.gateway.config import Limits

RESPONSES_TEXT = ChainText(
    orphan="'{param}': no tool call found for function call output with call_id {id}.",
    unexpected="'{param}': no tool call found for function call output with call_id {id}.",
    missing="No tool output found for function call {ids}.")
KNOWN = frozenset({"model", "input", "instructions", "previous_response_id",
                   "max_output_tokens", "temperature", "top_p", "stream", "store", "tools",
                   "tool_choice", "parallel_tool_calls", "text", "metadata", "user"})
_MEDIA = frozenset({"input_image", "input_file", "input_audio"})
_TEXT_KINDS = frozenset({"input_text", "output_text"})
_MODES: dict[str, ChoiceMode] = {"auto": "auto", "none": "none", "required": "required"}
_FORMATS = frozenset({"text", "json_object", "json_schema"})


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    """`conversation` is `input` alone (see the module docstring); `response_format` the
    `text.format` object as sent; `metadata` the string pairs as sent."""

    model: str
    conversation: Conversation
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool = True
    response_format: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None


def _texts(v: object, param: str) -> tuple[Text, ...]:
    return text_parts(v, param, _TEXT_KINDS, _MEDIA, "'{p}.type' must be \"input_text\" or "
                      "\"output_text\", got {kind!r}.")


def _reasoning(it: dict[str, Any], p: str) -> Reasoning | None:
    def texts(key: str, kind: str) -> list[str]:
        out = []
        for j, s in enumerate(list_at(it.get(key) or [], f"{p}.{key}")):
            if obj_at(s, f"{p}.{key}[{j}]").get("type") != kind:
                raise invalid(f"'{p}.{key}[{j}].type' must be \"{kind}\".", f"{p}.{key}[{j}].type")
            out.append(str_at(s.get("text"), f"{p}.{key}[{j}].text"))
        return out

    summary, content = texts("summary", "summary_text"), texts("content", "reasoning_text")
    text = "\n".join(content or summary)
    signature = opt_str(it, "encrypted_content", p)
    return Reasoning(text, signature) if text or signature is not None else None


def _item(b: TurnBuilder, item: object, i: int) -> None:
    p = f"input[{i}]"
    it = obj_at(item, p)
    kind = it.get("type", "message" if "role" in it else None)
    if kind == "message":
        role, texts = it.get("role"), _texts(it.get("content"), f"{p}.content")
        if role in ("system", "developer"):
            b.system(texts, p)
        elif role == "user":
            b.user(texts, p)
        elif role == "assistant":
            b.assistant(texts, p, merge=True)
        else:
            raise invalid(f"'{p}.role' must be one of assistant, developer, system, user; got "
                          f"{role!r}.", f"{p}.role")
    elif kind == "function_call":
        b.assistant((ToolCall(str_at(it.get("call_id"), f"{p}.call_id", non_empty=True),
                              str_at(it.get("name"), f"{p}.name", non_empty=True),
                              json_object_text(it.get("arguments"), f"{p}.arguments"),
                              cache_hint(it, p)),), p, merge=True)
    elif kind == "function_call_output":
        out = it.get("output")
        content = out if type(out) is str else "\n".join(
            t.text for t in _texts(out, f"{p}.output"))
        b.result(ToolResult(str_at(it.get("call_id"), f"{p}.call_id", non_empty=True), content,
                            opt_bool(it, "is_error", False, p), cache_hint(it, p)),
                 p, f"{p}.call_id")
    elif kind == "reasoning":
        r = _reasoning(it, p)
        if r is not None:
            b.assistant((r,), p, merge=True)
    else:
        raise invalid(f"'{p}.type': input item type {kind!r} is not supported (supported: "
                      "message, function_call, function_call_output, reasoning).", f"{p}.type")


def _input(v: object, open_start: bool) -> tuple[tuple[Text, ...], tuple[Turn, ...]]:
    b = TurnBuilder(RESPONSES_TEXT, open_start=open_start)
    if type(v) is str and v:
        b.user((Text(v),), "input")
    elif type(v) is list and v:
        for i, item in enumerate(v):
            _item(b, item, i)
    else:
        raise invalid("'input' must be a non-empty string or a non-empty list of items.",
                      "input")
    return b.build()


def _tools(v: object) -> tuple[ToolSpec, ...]:
    specs = []
    for j, t in enumerate(list_at(v, "tools")):
        p = f"tools[{j}]"
        kind = obj_at(t, p).get("type")
        if kind != "function":
            raise invalid(f"'{p}.type': tool type {kind!r} is not supported; only 'function' "
                          "tools are.", f"{p}.type")
        strict = t.get("strict")
        specs.append(ToolSpec(tool_name(t.get("name"), f"{p}.name"),
                              opt_str(t, "description", p),
                              schema_text(t.get("parameters"), f"{p}.parameters",
                                          required=False),
                              None if strict is None else opt_bool(t, "strict", False, p),
                              cache_hint(t, p)))
    return unique_tools(specs, "tools[{j}].name")


def _choice(v: object, tools: tuple[ToolSpec, ...]) -> ToolChoice | None:
    if v is None:
        return None
    if type(v) is str and v in _MODES:
        return checked_choice(ToolChoice(_MODES[v]), tools, "tool_choice")
    if type(v) is dict and v.get("type") == "function":
        name = str_at(v.get("name"), "tool_choice.name", non_empty=True)
        return checked_choice(ToolChoice("tool", name), tools, "tool_choice.name")
    raise invalid("'tool_choice' must be \"auto\", \"none\", \"required\" or "
                  "{\"type\": \"function\", \"name\": ...}; other tool choices are not "
                  "supported.", "tool_choice")


def _format(v: object) -> dict[str, Any] | None:
    if v is None:
        return None
    text = obj_at(v, "text")
    refuse_unknown(text, frozenset({"format"}), "text")
    f = text.get("format")
    if f is None:
        return None
    fmt = obj_at(f, "text.format")
    if fmt.get("type") not in _FORMATS:
        raise invalid(f"'text.format.type' must be one of {', '.join(sorted(_FORMATS))}.",
                      "text.format.type")
    if fmt["type"] == "json_schema":
        tool_name(fmt.get("name"), "text.format.name")
        obj_at(fmt.get("schema"), "text.format.schema")
        opt_bool(fmt, "strict", False, "text.format")
        opt_str(fmt, "description", "text.format")
    return dict(fmt)


def _metadata(v: object) -> dict[str, str] | None:
    if v is None:
        return None
    meta = obj_at(v, "metadata")
    if len(meta) > 16:
        raise invalid("'metadata' may hold at most 16 pairs.", "metadata")
    for k, val in meta.items():
        if len(k) > 64 or type(val) is not str or len(val) > 512:
            raise invalid(f"'metadata.{k}': keys are at most 64 characters and values strings "
                          "of at most 512.", f"metadata.{k}")
    return dict(meta)


def parse_responses_request(obj: object, lim: Limits) -> ResponsesRequest:
    """Validate a /v1/responses body. Raises ApiError(400) naming the field."""
    body = obj_at(obj, "body", "a JSON object (the request body)")
    refuse_unknown(body, KNOWN)
    model = str_at(body.get("model"), "model", non_empty=True)
    prev = opt_str(body, "previous_response_id")
    system, turns = _input(body.get("input"), prev is not None)
    tools = () if body.get("tools") is None else _tools(body["tools"])
    conv = Conversation(system, turns, tools, _choice(body.get("tool_choice"), tools),
                        opt_bool(body, "parallel_tool_calls", True), prev is not None)
    return ResponsesRequest(
        model, conv, opt_str(body, "instructions"), prev,
        opt_int(body, "max_output_tokens", 1, lim.max_tokens),
        opt_float(body, "temperature", 0.0, 2.0),
        opt_float(body, "top_p", 0.0, 1.0, lo_open=True), opt_bool(body, "stream", False),
        opt_bool(body, "store", True), _format(body.get("text")),
        _metadata(body.get("metadata")), opt_str(body, "user"))


def continue_conversation(previous: Conversation, new: Conversation) -> Conversation:
    """`previous` (a stored conversation) followed by `new` (a request's input, `open_start`):
    the system prompt is the stored one, the tools and tool choice the new ones. Raises
    ApiError(400, param "input") when the new input's tool results do not answer exactly the
    stored response's open calls, or when it reuses one of its call ids."""
    last = previous.turns[-1] if previous.turns else None
    calls = [c.id for c in last.calls()] if last is not None and last.role == "assistant" else []
    first = new.turns[0] if new.turns else None
    answered = [r.call_id for r in first.results()] if first is not None else []
    for call_id in answered:
        if call_id not in calls:
            raise invalid(RESPONSES_TEXT.unexpected.format(param="input", id=call_id), "input")
    left = [c for c in calls if c not in answered]
    if left and first is not None:
        raise invalid(RESPONSES_TEXT.missing.format(ids=", ".join(left)), "input")
    old = {c.id for t in previous.turns for c in t.calls()}
    for t in new.turns:
        for c in t.calls():
            if c.id in old:
                raise invalid(f"'input': the tool call id {c.id} is already used in the "
                              "previous response's conversation.", "input")
    return Conversation(previous.system, previous.turns + new.turns, new.tools, new.tool_choice,
                        new.parallel_tool_calls, previous.open_start)


def with_instructions(conv: Conversation, instructions: str | None) -> Conversation:
    """What the model sees: `instructions` (if any) before the conversation's system prompt."""
    if not instructions:
        return conv
    return replace(conv, system=(Text(instructions), *conv.system))


def conversation_after(conv: Conversation, completion: Completion) -> Conversation:
    """The conversation to store under the new response's id (`conv` without instructions)."""
    return replace(conv, turns=(*conv.turns, completion_turn(completion)))
