"""OpenAI chat/completions messages <-> the internal model.

`conversation_from_chat` reads the raw `messages`, `tools`, `tool_choice` and
`parallel_tool_calls` of a chat body (the rest of the body is `http/openai_api.py`'s) and
raises `ApiError(400)` naming the field. `developer` is read as `system`; `reasoning_content`
(or vLLM's newer `reasoning`) on an assistant message is its reasoning; only text content parts
are accepted. The legacy `function` role and `function_call` are refused (use `tool_calls`).
Keys this module does not read (`name`, `refusal`, `annotations`, ...) are ignored.

meshd extensions, so a chain from another dialect renders here without loss:
`cache_control` (`{"type": "ephemeral"}`, as OpenRouter and LiteLLM accept it) on a text part,
on a `tool_calls` entry and on a `tools` entry; `is_error: true` on a `tool` message.
Reasoning signatures are not carried (OpenAI chat has no place for them).
"""

from __future__ import annotations

from typing import Any

from meshd.api_errors import invalid
from meshd.coordinator.gateway.dialects.chain import ChainText, TurnBuilder
from meshd.coordinator.gateway.dialects.fields import (
    cache_hint,
    checked_choice,
    json_object_text,
    list_at,
    obj_at,
    opt_bool,
    opt_str,
    schema_text,
    str_at,
    text_parts,
    tool_name,
    unique_tools,
)
from meshd.coordinator.gateway.dialects.model import (
    Block,
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
)

CHAT_TEXT = ChainText(
    orphan="'{param}': a message with role 'tool' must follow an assistant message with "
           "'tool_calls' (or another tool message).",
    unexpected="'{param}' ({id}) answers no tool call of the preceding assistant message.",
    missing="An assistant message with 'tool_calls' must be followed by tool messages "
            "responding to each 'tool_call_id'. The following tool_call_ids did not have "
            "response messages: {ids}")
FINISH_REASONS = {"stop": "stop", "stop_sequence": "stop", "length": "length",
                  "tool_calls": "tool_calls"}
_MODES: dict[str, ChoiceMode] = {"auto": "auto", "none": "none", "required": "required"}
_MEDIA = frozenset({"image_url", "input_audio", "file", "image", "audio"})
_EPHEMERAL = {"type": "ephemeral"}
_TEXT = frozenset({"text"})


def _parts(v: object, param: str) -> tuple[Text, ...]:
    return text_parts(v, param, _TEXT, _MEDIA, "'{p}' must be a text part "
                      "({{\"type\": \"text\", \"text\": ...}}), got type {kind!r}.")


def _call(v: object, param: str) -> ToolCall:
    c = obj_at(v, param)
    if c.get("type", "function") != "function":
        raise invalid(f"'{param}.type' must be \"function\".", f"{param}.type")
    fn = obj_at(c.get("function"), f"{param}.function")
    return ToolCall(str_at(c.get("id"), f"{param}.id", non_empty=True),
                    str_at(fn.get("name"), f"{param}.function.name", non_empty=True),
                    json_object_text(fn.get("arguments"), f"{param}.function.arguments"),
                    cache_hint(c, param))


def _assistant(m: dict[str, Any], param: str) -> tuple[Block, ...]:
    blocks: list[Block] = []
    reasoning = opt_str(m, "reasoning_content", param) or opt_str(m, "reasoning", param)
    if reasoning:
        blocks.append(Reasoning(reasoning))
    raw_calls = m.get("tool_calls")
    calls = [] if raw_calls is None else list_at(raw_calls, f"{param}.tool_calls")
    content = m.get("content")
    if content is None or content == []:
        if not calls and not blocks:
            raise invalid(f"'{param}.content' is required unless 'tool_calls' are given.",
                          f"{param}.content")
    elif content != "" or not calls:
        blocks.extend(_parts(content, f"{param}.content"))
    blocks.extend(_call(c, f"{param}.tool_calls[{k}]") for k, c in enumerate(calls))
    return tuple(blocks)


def _message(b: TurnBuilder, m: object, i: int) -> None:
    param = f"messages[{i}]"
    msg = obj_at(m, param)
    role = msg.get("role")
    if role == "function" or msg.get("function_call") is not None:
        raise invalid(f"'{param}': the legacy 'function' role and 'function_call' are not "
                      "supported; use 'tool_calls' and role 'tool'.", param)
    if role in ("system", "developer"):
        b.system(_parts(msg.get("content"), f"{param}.content"), param)
    elif role == "user":
        b.user(_parts(msg.get("content"), f"{param}.content"), param)
    elif role == "assistant":
        b.assistant(_assistant(msg, param), param)
    elif role == "tool":
        call_id = str_at(msg.get("tool_call_id"), f"{param}.tool_call_id", non_empty=True)
        texts = _parts(msg.get("content"), f"{param}.content")
        b.result(ToolResult(call_id, "\n".join(t.text for t in texts),
                            opt_bool(msg, "is_error", False, param),
                            any(t.cache_hint for t in texts)), param, f"{param}.tool_call_id")
    else:
        raise invalid(f"'{param}.role' must be one of assistant, developer, system, tool, "
                      f"user; got {role!r}.", f"{param}.role")


def _tools(v: object) -> tuple[ToolSpec, ...]:
    specs = []
    for j, t in enumerate(list_at(v, "tools")):
        p = f"tools[{j}]"
        kind = obj_at(t, p).get("type")
        if kind != "function":
            raise invalid(f"'{p}.type': tool type {kind!r} is not supported; only 'function' "
                          "tools are.", f"{p}.type")
        fn = obj_at(t.get("function"), f"{p}.function")
        strict = fn.get("strict")
        specs.append(ToolSpec(
            tool_name(fn.get("name"), f"{p}.function.name"),
            opt_str(fn, "description", f"{p}.function"),
            schema_text(fn.get("parameters"), f"{p}.function.parameters", required=False),
            None if strict is None else opt_bool(fn, "strict", False, f"{p}.function"),
            cache_hint(t, p)))
    return unique_tools(specs, "tools[{j}].function.name")


def _choice(v: object, tools: tuple[ToolSpec, ...]) -> ToolChoice | None:
    if v is None:
        return None
    if type(v) is str and v in _MODES:
        return checked_choice(ToolChoice(_MODES[v]), tools, "tool_choice")
    if type(v) is dict and v.get("type") == "function" and type(v.get("function")) is dict:
        name = str_at(v["function"].get("name"), "tool_choice.function.name", non_empty=True)
        return checked_choice(ToolChoice("tool", name), tools, "tool_choice.function.name")
    raise invalid("'tool_choice' must be \"auto\", \"none\", \"required\" or "
                  "{\"type\": \"function\", \"function\": {\"name\": ...}}.", "tool_choice")


def conversation_from_chat(messages: object, tools: object = None, tool_choice: object = None,
                           parallel_tool_calls: object = None) -> Conversation:
    """The conversation of a chat body's fields (raw JSON values). Raises ApiError(400)."""
    b = TurnBuilder(CHAT_TEXT)
    for i, m in enumerate(list_at(messages, "messages", non_empty=True)):
        _message(b, m, i)
    system, turns = b.build()
    specs = () if tools is None else _tools(tools)
    parallel = opt_bool({"parallel_tool_calls": parallel_tool_calls}, "parallel_tool_calls", True)
    return Conversation(system, turns, specs, _choice(tool_choice, specs), parallel)


def _content(texts: tuple[Text, ...]) -> str | list[dict[str, Any]]:
    if len(texts) == 1 and not texts[0].cache_hint:
        return texts[0].text
    return [{"type": "text", "text": t.text, **({"cache_control": _EPHEMERAL}
                                                if t.cache_hint else {})} for t in texts]


def _hint(on: bool) -> dict[str, Any]:
    return {"cache_control": dict(_EPHEMERAL)} if on else {}


def _render_assistant(turn: Turn) -> dict[str, Any]:
    texts = turn.texts()
    msg: dict[str, Any] = {"role": "assistant", "content": _content(texts) if texts else None}
    calls = turn.calls()
    if calls:
        msg["tool_calls"] = [{"id": c.id, "type": "function", **_hint(c.cache_hint),
                              "function": {"name": c.name, "arguments": c.arguments}}
                             for c in calls]
    reasoning = [r.text for r in turn.reasoning() if r.text]
    if reasoning:
        msg["reasoning_content"] = "\n".join(reasoning)
    return msg


def _render_turn(turn: Turn) -> list[dict[str, Any]]:
    if turn.role == "assistant":
        return [_render_assistant(turn)]
    out: list[dict[str, Any]] = []
    for r in turn.results():
        msg: dict[str, Any] = {"role": "tool", "tool_call_id": r.call_id,
                               "content": _content((Text(r.content, r.cache_hint),))}
        if r.is_error:
            msg["is_error"] = True
        out.append(msg)
    if turn.texts():
        out.append({"role": turn.role, "content": _content(turn.texts())})
    return out


def chat_tool(spec: ToolSpec) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": spec.name}
    if spec.description is not None:
        fn["description"] = spec.description
    if spec.parameters is not None:
        fn["parameters"] = spec.schema()
    if spec.strict is not None:
        fn["strict"] = spec.strict
    return {"type": "function", "function": fn, **_hint(spec.cache_hint)}


def chat_body_from_conversation(conv: Conversation) -> dict[str, Any]:
    """`messages` (and `tools`, `tool_choice`, `parallel_tool_calls` where they say anything)
    of a chat body; `conversation_from_chat` reads it back to `conv`."""
    messages = [{"role": "system", "content": _content(conv.system)}] if conv.system else []
    for turn in conv.turns:
        messages.extend(_render_turn(turn))
    body: dict[str, Any] = {"messages": messages}
    if conv.tools:
        body["tools"] = [chat_tool(t) for t in conv.tools]
    tc = conv.tool_choice
    if tc is not None:
        body["tool_choice"] = (tc.mode if tc.mode != "tool" else
                               {"type": "function", "function": {"name": tc.name}})
    if not conv.parallel_tool_calls:
        body["parallel_tool_calls"] = False
    return body


def chat_message_from_completion(c: Completion) -> dict[str, Any]:
    """The `choices[].message` of a chat response: `content` None when the model only called
    tools, `reasoning_content` when it reasoned."""
    msg: dict[str, Any] = {"role": "assistant",
                           "content": c.text if c.text or not c.tool_calls else None}
    if c.tool_calls:
        msg["tool_calls"] = [{"id": t.id, "type": "function",
                              "function": {"name": t.name, "arguments": t.arguments}}
                             for t in c.tool_calls]
    if c.reasoning is not None:
        msg["reasoning_content"] = c.reasoning
    return msg


def chat_finish_reason(c: Completion) -> str:
    return FINISH_REASONS[c.finish]
