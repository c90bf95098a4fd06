"""The internal model out to Anthropic: responses, stream events, error bodies, request bodies.

`message_from_completion` is the non-streaming `Message`; `MessageStream` turns a completion's
pieces, as they arrive, into Anthropic's event sequence (`message_start`, per block
`content_block_start` / `_delta` / `_stop`, `message_delta`, `message_stop`, `ping`); each call
returns `(event_name, data)` pairs, `data` carrying the same `type`. Usage follows Anthropic:
`input_tokens` excludes cache reads (`cache_read_input_tokens`); meshd writes no cache, so
`cache_creation_input_tokens` is 0. Thinking blocks carry `signature: ""` (meshd signs nothing;
the SDK's `ThinkingBlock` needs the field) and no `signature_delta` is streamed.
`messages_body_from_conversation` writes a conversation as a request body (`system`,
`messages`, `tools`, `tool_choice`) that `parse_messages_request` reads back.
"""

from __future__ import annotations

from typing import Any

from meshd.coordinator.gateway.dialects.model import (
    Block,
    Completion,
    Conversation,
    Finish,
    Reasoning,
    Text,
    ToolCall,
    ToolResult,
    Usage,
    arguments_object,
)

STOP_REASONS: dict[str, str] = {"stop": "end_turn", "length": "max_tokens",
                                "tool_calls": "tool_use", "stop_sequence": "stop_sequence"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 503: "overloaded_error",
               504: "timeout_error", 529: "overloaded_error"}
Event = tuple[str, dict[str, Any]]


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    """`{"type": "error", "error": {"type", "message"}}`; an unlisted 4xx is an
    invalid_request_error, anything else an api_error."""
    kind = ERROR_TYPES.get(status) or ("invalid_request_error" if 400 <= status < 500
                                       else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def usage_dict(u: Usage) -> dict[str, int]:
    return {"input_tokens": u.prompt_tokens - u.cached_tokens,
            "output_tokens": u.completion_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": u.cached_tokens}


def _tool_use(c: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": c.id, "name": c.name, "input": arguments_object(c)}


def message_from_completion(c: Completion, *, id: str, model: str,
                            usage: Usage) -> dict[str, Any]:
    """The Messages API response. ValueError if a call's arguments are not a JSON object."""
    content: list[dict[str, Any]] = []
    if c.reasoning:
        content.append({"type": "thinking", "thinking": c.reasoning, "signature": ""})
    if c.text:
        content.append({"type": "text", "text": c.text})
    content.extend(_tool_use(t) for t in c.tool_calls)
    return {"id": id, "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": STOP_REASONS[c.finish],
            "stop_sequence": c.stop_sequence, "usage": usage_dict(usage)}


class MessageStream:
    """One streamed message. Call `start` first, then any of `text` / `reasoning` /
    `tool_call_start` + `tool_args`, then `finish`; `ping` at any time. A block closes when a
    block of another kind (or another tool call) starts, or at `finish`. Not thread-safe."""

    __slots__ = ("_index", "_kind")

    def __init__(self) -> None:
        self._index = -1
        self._kind: str | None = None  # the open block's type

    def start(self, id: str, model: str, usage: Usage) -> list[Event]:
        msg: dict[str, Any] = {
            "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {**usage_dict(usage), "output_tokens": 0}}
        return [("message_start", {"type": "message_start", "message": msg})]

    def ping(self) -> list[Event]:
        return [("ping", {"type": "ping"})]

    def text(self, delta: str) -> list[Event]:
        return self._delta("text", {"type": "text", "text": ""},
                           {"type": "text_delta", "text": delta}, delta)

    def reasoning(self, delta: str) -> list[Event]:
        return self._delta("thinking", {"type": "thinking", "thinking": "", "signature": ""},
                           {"type": "thinking_delta", "thinking": delta}, delta)

    def tool_call_start(self, id: str, name: str) -> list[Event]:
        events = self._close()
        events.append(self._open("tool_use", {"type": "tool_use", "id": id, "name": name,
                                              "input": {}}))
        return events

    def tool_args(self, delta: str) -> list[Event]:
        if self._kind != "tool_use":
            raise ValueError("MessageStream.tool_args without an open tool call")
        return self._delta("tool_use", {}, {"type": "input_json_delta", "partial_json": delta},
                           delta)

    def finish(self, finish: Finish, stop_sequence: str | None,
               output_tokens: int) -> list[Event]:
        events = self._close()
        events.append(("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": STOP_REASONS[finish], "stop_sequence": stop_sequence},
            "usage": {"output_tokens": output_tokens}}))
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def _delta(self, kind: str, block: dict[str, Any], delta: dict[str, Any],
               text: str) -> list[Event]:
        if not text:
            return []
        events = [] if self._kind == kind else [*self._close(), self._open(kind, block)]
        events.append(("content_block_delta", {"type": "content_block_delta",
                                               "index": self._index, "delta": delta}))
        return events

    def _open(self, kind: str, block: dict[str, Any]) -> Event:
        self._index += 1
        self._kind = kind
        return ("content_block_start", {"type": "content_block_start", "index": self._index,
                                        "content_block": block})

    def _close(self) -> list[Event]:
        if self._kind is None:
            return []
        self._kind = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self._index})]


_EPHEMERAL = {"type": "ephemeral"}


def _hinted(d: dict[str, Any], on: bool) -> dict[str, Any]:
    if on:
        d["cache_control"] = dict(_EPHEMERAL)
    return d


def _render_block(b: Block) -> dict[str, Any]:
    if isinstance(b, Text):
        return _hinted({"type": "text", "text": b.text}, b.cache_hint)
    if isinstance(b, ToolCall):
        return _hinted(_tool_use(b), b.cache_hint)
    if isinstance(b, ToolResult):
        d: dict[str, Any] = {"type": "tool_result", "tool_use_id": b.call_id,
                             "content": b.content}
        if b.is_error:
            d["is_error"] = True
        return _hinted(d, b.cache_hint)
    assert isinstance(b, Reasoning)
    if b.redacted:
        return {"type": "redacted_thinking", "data": b.signature}
    d = {"type": "thinking", "thinking": b.text}
    if b.signature is not None:
        d["signature"] = b.signature
    return d


def messages_body_from_conversation(conv: Conversation) -> dict[str, Any]:
    """`system`, `messages`, `tools`, `tool_choice` of a Messages body (the caller adds
    `model` and `max_tokens`). Consecutive turns of one role are merged, as Anthropic would.
    ValueError for a system turn after the first (Anthropic has no place for it)."""
    messages: list[dict[str, Any]] = []
    for i, turn in enumerate(conv.turns):
        if turn.role == "system":
            raise ValueError(f"turn {i}: Anthropic messages cannot hold a system turn")
        blocks = [_render_block(b) for b in turn.blocks]
        if messages and messages[-1]["role"] == turn.role:
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": turn.role, "content": blocks})
    body: dict[str, Any] = {"messages": messages}
    if conv.system:
        body["system"] = [_render_block(t) for t in conv.system]
    if conv.tools:
        body["tools"] = [_hinted({"name": t.name, **({"description": t.description}
                                                     if t.description is not None else {}),
                                  "input_schema": t.schema() or {"type": "object"},
                                  **({"strict": t.strict} if t.strict is not None else {})},
                                 t.cache_hint) for t in conv.tools]
    tc = conv.tool_choice
    if tc is not None or not conv.parallel_tool_calls:
        mode = "auto" if tc is None else {"required": "any"}.get(tc.mode, tc.mode)
        choice: dict[str, Any] = {"type": mode}
        if tc is not None and tc.name is not None:
            choice["name"] = tc.name
        if not conv.parallel_tool_calls:
            choice["disable_parallel_tool_use"] = True
        body["tool_choice"] = choice
    return body
