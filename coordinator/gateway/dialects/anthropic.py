"""Validation of Anthropic Messages bodies (`POST /v1/messages`) into `MessagesRequest`.

`parse_messages_request(obj, limits)` takes the decoded body (not mutated) and raises
`ApiError(400)` with `param` the JSON path (`messages[2].content[0].tool_use_id`); the HTTP
layer encodes it the Anthropic way (`anthropic_out.anthropic_error_body`). Anthropic's rules:
`model`, `max_tokens` (1..limits.max_tokens) and a non-empty `messages` are required; roles are
user/assistant, the first is user; content is a string or blocks (`text` with optional
`cache_control`; `tool_use` and `thinking`/`redacted_thinking` in assistant turns; `tool_result`
in user turns, before any text, answering every `tool_use` of the assistant turn just before,
whose texts are Anthropic's own); at most 4 blocks carry `cache_control`; text must hold
non-whitespace; `image`/`document` blocks are refused (text models only).

Decided here, where Anthropic is lenient or meshd cannot follow:
- consecutive turns of one role are refused naming the index (Anthropic merges them; a merge
  would hide a client's bug and change where tool results sit);
- the final assistant turn is a prefill: it may be empty (then dropped) or hold only text,
  without trailing whitespace; its text ("\\n"-joined, as the template joins it) is `prefill`
  and the turn stays in the conversation for the template to continue;
- `thinking` is accepted only as `{"type": "disabled"}`: meshd does not control reasoning
  budgets, so `enabled`/`adaptive` get a 400 rather than being silently ignored;
- unknown top-level fields are refused, listing them; unknown keys inside blocks and tools
  are ignored (SDKs echo `citations: null` and the like);
- `stop_sequences` holds at most `limits.max_stop` non-empty strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshd.api_errors import invalid
from meshd.coordinator.gateway.dialects.chain import ChainText, TurnBuilder
from meshd.coordinator.gateway.dialects.fields import (
    INT_MAX,
    cache_hint,
    checked_choice,
    dump_json,
    list_at,
    obj_at,
    opt_bool,
    opt_float,
    opt_int,
    opt_str,
    refuse_unknown,
    str_at,
    tool_name,
    unique_tools,
    unsupported,
)
from meshd.coordinator.gateway.dialects.model import (
    Block,
    ChoiceMode,
    Conversation,
    Reasoning,
    Text,
    ToolCall,
    ToolChoice,
    ToolResult,
    ToolSpec,
    cache_hint_count,
)

if TYPE_CHECKING:
    from meshd.coordinator.gateway.config import Limits

_UNEXPECTED = ("unexpected tool_use_id found in tool_result blocks: {id}. Each tool_result "
               "block must have a corresponding tool_use block in the previous message.")
ANTHROPIC_TEXT = ChainText(
    orphan=_UNEXPECTED, unexpected=_UNEXPECTED,
    missing="tool_use ids were found without tool_result blocks immediately after: {ids}. "
            "Each tool_use block must have a corresponding tool_result block in the next "
            "message.",
    duplicate="'{param}': the tool_use {id} has more than one tool_result.",
    duplicate_call="'{param}': tool_use ids must be unique; {id} is used twice.")
KNOWN = frozenset({"model", "max_tokens", "messages", "system", "stop_sequences", "temperature",
                   "top_p", "top_k", "metadata", "stream", "tools", "tool_choice", "thinking"})
MAX_CACHE_BLOCKS = 4
_TOOL_USE_ID = re.compile(r"[a-zA-Z0-9_-]+")
_MEDIA = frozenset({"image", "document", "search_result", "container_upload"})
_CHOICES: dict[str, ChoiceMode] = {"auto": "auto", "any": "required", "none": "none",
                                   "tool": "tool"}


@dataclass(frozen=True, slots=True)
class MessagesSampling:
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MessagesRequest:
    """`prefill`: the text the completion continues ("" when the last turn is the user's)."""

    model: str
    conversation: Conversation
    sampling: MessagesSampling
    stream: bool = False
    user: str | None = None
    prefill: str = ""


def _text(v: object, param: str) -> str:
    if type(v) is not str or not v.strip():
        raise invalid(f"'{param}': text content blocks must contain non-whitespace text.",
                      param)
    return v


def _result_content(v: object, param: str) -> tuple[str, bool]:
    if v is None or type(v) is str:
        return v or "", False
    texts, hint = [], False
    for k, part in enumerate(list_at(v, param)):
        p = f"{param}[{k}]"
        kind = obj_at(part, p).get("type")
        if kind in _MEDIA:
            raise unsupported(f"a {kind!r} block", f"{p}.type")
        if kind != "text":
            raise invalid(f"'{p}.type' must be \"text\", got {kind!r}.", f"{p}.type")
        texts.append(str_at(part.get("text"), f"{p}.text"))
        hint = cache_hint(part, p) or hint
    return "\n".join(texts), hint


def _block(blk: object, p: str, role: str) -> Block:
    b = obj_at(blk, p)
    kind = b.get("type")
    allowed = {"user": ("text", "tool_result"),
               "assistant": ("text", "tool_use", "thinking", "redacted_thinking")}[role]
    if kind in _MEDIA:
        raise unsupported(f"a {kind!r} block", f"{p}.type")
    if kind not in allowed:
        where = ("assistant" if kind in ("tool_use", "thinking", "redacted_thinking")
                 else "user" if kind == "tool_result" else None)
        why = (f"{kind} blocks are only allowed in {where} messages" if where else
               f"unknown or unsupported block type {kind!r}")
        raise invalid(f"'{p}.type': {why} (allowed here: {', '.join(allowed)}).", f"{p}.type")
    if kind == "text":
        return Text(_text(b.get("text"), f"{p}.text"), cache_hint(b, p))
    if kind == "tool_use":
        call_id = b.get("id")
        if type(call_id) is not str or not _TOOL_USE_ID.fullmatch(call_id):
            raise invalid(f"'{p}.id' must match ^[a-zA-Z0-9_-]+$, got {call_id!r}.", f"{p}.id")
        return ToolCall(call_id, str_at(b.get("name"), f"{p}.name", non_empty=True),
                        dump_json(obj_at(b.get("input"), f"{p}.input")), cache_hint(b, p))
    if kind == "tool_result":
        content, inner = _result_content(b.get("content"), f"{p}.content")
        return ToolResult(str_at(b.get("tool_use_id"), f"{p}.tool_use_id", non_empty=True),
                          content, opt_bool(b, "is_error", False, p), cache_hint(b, p) or inner)
    if b.get("cache_control") is not None:
        raise invalid(f"'{p}.cache_control': {kind} blocks cannot be marked for caching.",
                      f"{p}.cache_control")
    if kind == "thinking":
        return Reasoning(str_at(b.get("thinking"), f"{p}.thinking"), opt_str(b, "signature", p))
    return Reasoning("", str_at(b.get("data"), f"{p}.data", non_empty=True), redacted=True)


def _blocks(content: object, p: str, role: str) -> tuple[Block, ...]:
    if type(content) is str:
        return (Text(_text(content, p)),)
    return tuple(_block(blk, f"{p}[{j}]", role)
                 for j, blk in enumerate(list_at(content, p)))


def _user(b: TurnBuilder, blocks: tuple[Block, ...], p: str) -> None:
    texts: list[Text] = []
    for j, blk in enumerate(blocks):
        if isinstance(blk, ToolResult):
            if texts:
                raise invalid(f"'{p}.content[{j}]': tool_result blocks must come before any "
                              "other content in a user message.", f"{p}.content[{j}]")
            b.result(blk, f"{p}.content[{j}].tool_use_id", f"{p}.content[{j}].tool_use_id")
        else:
            assert isinstance(blk, Text)
            texts.append(blk)
    if texts:
        b.user(tuple(texts), p)
    elif b.pending():
        raise invalid(ANTHROPIC_TEXT.missing.format(ids=", ".join(b.pending())), p)


def _prefill(blocks: tuple[Block, ...], p: str) -> str:
    if not all(isinstance(blk, Text) for blk in blocks):
        raise invalid(f"'{p}': the final assistant message is a prefill and may hold only text "
                      "blocks; tool_use blocks need a following user message with tool_result "
                      "blocks.", p)
    text = "\n".join(blk.text for blk in blocks if isinstance(blk, Text))
    if text != text.rstrip():
        raise invalid(f"'{p}': final assistant content cannot end with trailing whitespace.", p)
    return text


def _messages(v: object, b: TurnBuilder) -> str:
    msgs = list_at(v, "messages", non_empty=True)
    prev, prefill = None, ""
    for i, m in enumerate(msgs):
        p = f"messages[{i}]"
        role = obj_at(m, p).get("role")
        if role not in ("user", "assistant"):
            raise invalid(f"'{p}.role' must be \"user\" or \"assistant\", got {role!r}.",
                          f"{p}.role")
        if i == 0 and role != "user":
            raise invalid("The first message must use the \"user\" role.", f"{p}.role")
        if role == prev:
            raise invalid(f"'{p}': roles must alternate between \"user\" and \"assistant\"; "
                          f"messages[{i - 1}] and messages[{i}] are both {role!r} (meshd does "
                          "not merge consecutive turns).", f"{p}.role")
        prev, content = role, m.get("content")
        last_assistant = role == "assistant" and i == len(msgs) - 1
        if last_assistant and content in ("", []):
            break
        blocks = _blocks(content, f"{p}.content", role)
        if not blocks:
            raise invalid(f"'{p}.content' must not be empty (only the final assistant message "
                          "may be).", f"{p}.content")
        if role == "user":
            _user(b, blocks, p)
        else:
            prefill = _prefill(blocks, p) if last_assistant else ""
            b.assistant(blocks, p)
    return prefill


def _system(v: object) -> tuple[Text, ...]:
    if v is None or v == "":
        return ()
    if type(v) is str:
        return (Text(v),)
    out = []
    for j, blk in enumerate(list_at(v, "system")):
        p = f"system[{j}]"
        if obj_at(blk, p).get("type") != "text":
            raise invalid(f"'{p}.type' must be \"text\".", f"{p}.type")
        out.append(Text(_text(blk.get("text"), f"{p}.text"), cache_hint(blk, p)))
    return tuple(out)


def _tools(v: object) -> tuple[ToolSpec, ...]:
    specs = []
    for j, t in enumerate(list_at(v, "tools")):
        p = f"tools[{j}]"
        kind = obj_at(t, p).get("type")
        if kind not in (None, "custom"):
            raise invalid(f"'{p}.type': server tool {kind!r} is not supported; only client "
                          "tools (name, description, input_schema) are.", f"{p}.type")
        schema = obj_at(t.get("input_schema"), f"{p}.input_schema")
        if schema.get("type") != "object":
            raise invalid(f"'{p}.input_schema.type' must be \"object\".",
                          f"{p}.input_schema.type")
        strict = t.get("strict")
        specs.append(ToolSpec(tool_name(t.get("name"), f"{p}.name"),
                              opt_str(t, "description", p), dump_json(schema),
                              None if strict is None else opt_bool(t, "strict", False, p),
                              cache_hint(t, p)))
    return unique_tools(specs, "tools[{j}].name")


def _tool_choice(v: object, tools: tuple[ToolSpec, ...]) -> tuple[ToolChoice | None, bool]:
    if v is None:
        return None, True
    tc = obj_at(v, "tool_choice")
    refuse_unknown(tc, frozenset({"type", "name", "disable_parallel_tool_use"}), "tool_choice")
    mode = _CHOICES.get(str(tc.get("type")))
    if mode is None:
        raise invalid("'tool_choice.type' must be one of auto, any, tool, none.",
                      "tool_choice.type")
    name = tool_name(tc.get("name"), "tool_choice.name") if mode == "tool" else None
    choice = checked_choice(ToolChoice(mode, name), tools,
                            "tool_choice.name" if name else "tool_choice")
    return choice, not opt_bool(tc, "disable_parallel_tool_use", False, "tool_choice")


def _thinking(v: object) -> None:
    if v is None:
        return
    kind = obj_at(v, "thinking").get("type")
    if kind in ("enabled", "adaptive"):
        raise invalid(f"'thinking' of type {kind!r} is not supported: meshd does not control "
                      "reasoning budgets. Omit 'thinking' or send {\"type\": \"disabled\"}.",
                      "thinking.type")
    if kind != "disabled":
        raise invalid("'thinking.type' must be \"disabled\".", "thinking.type")


def _sampling(body: dict[str, Any], lim: Limits) -> MessagesSampling:
    max_tokens = opt_int(body, "max_tokens", 1, lim.max_tokens)
    if max_tokens is None:
        raise invalid("'max_tokens' is required.", "max_tokens")
    stops = list_at(body.get("stop_sequences", []), "stop_sequences")
    if len(stops) > lim.max_stop:
        raise invalid(f"'stop_sequences' may hold at most {lim.max_stop} sequences.",
                      "stop_sequences")
    for k, s in enumerate(stops):
        str_at(s, f"stop_sequences[{k}]", non_empty=True)
    return MessagesSampling(max_tokens, opt_float(body, "temperature", 0.0, 1.0),
                            opt_float(body, "top_p", 0.0, 1.0, lo_open=True),
                            opt_int(body, "top_k", 1, INT_MAX), tuple(stops))


def parse_messages_request(obj: object, lim: Limits) -> MessagesRequest:
    """Validate a /v1/messages body. Raises ApiError(400) naming the field."""
    body = obj_at(obj, "body", "a JSON object (the request body)")
    refuse_unknown(body, KNOWN)
    model = str_at(body.get("model"), "model", non_empty=True)
    sampling = _sampling(body, lim)
    _thinking(body.get("thinking"))
    meta = obj_at(body.get("metadata", {}), "metadata")
    refuse_unknown(meta, frozenset({"user_id"}), "metadata")
    b = TurnBuilder(ANTHROPIC_TEXT)
    prefill = _messages(body.get("messages"), b)
    _, turns = b.build()
    tools = () if body.get("tools") is None else _tools(body["tools"])
    choice, parallel = _tool_choice(body.get("tool_choice"), tools)
    conv = Conversation(_system(body.get("system")), turns, tools, choice, parallel)
    hints = cache_hint_count(conv)
    if hints > MAX_CACHE_BLOCKS:
        raise invalid(f"A maximum of {MAX_CACHE_BLOCKS} blocks with cache_control may be "
                      f"provided. Found {hints}.")
    return MessagesRequest(model, conv, sampling, opt_bool(body, "stream", False),
                           opt_str(meta, "user_id", "metadata"), prefill)
