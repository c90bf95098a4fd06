"""Anthropic responses, stream events and error bodies, checked against the `anthropic` SDK's
pydantic models so a schema drift fails here."""

from __future__ import annotations

from typing import Any

import pytest

from meshd.coordinator.gateway.dialects.anthropic_out import (
    MessageStream,
    anthropic_error_body,
    message_from_completion,
    messages_body_from_conversation,
)
from meshd.coordinator.gateway.dialects.model import (
    Completion,
    Conversation,
    Text,
    ToolCall,
    Turn,
    Usage,
)

anthropic = pytest.importorskip("anthropic")
USAGE = Usage(prompt_tokens=100, completion_tokens=7, cached_tokens=64)
CALL = ToolCall("toolu_1", "get", '{"city": "Paris"}')
WIRE_USAGE = {"input_tokens": 36, "output_tokens": 7, "cache_creation_input_tokens": 0,
              "cache_read_input_tokens": 64}

def without_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


MESSAGES: list[tuple[Completion, list[dict[str, Any]], str, str | None]] = [
    (Completion("hi"), [{"type": "text", "text": "hi"}], "end_turn", None),
    (Completion(), [], "end_turn", None),
    (Completion("cut", finish="length"), [{"type": "text", "text": "cut"}], "max_tokens", None),
    (Completion("x", finish="stop_sequence", stop_sequence="END"),
     [{"type": "text", "text": "x"}], "stop_sequence", "END"),
    (Completion("let me", "think", (CALL, ToolCall("toolu_2", "put", "{}")), "tool_calls"),
     [{"type": "thinking", "thinking": "think", "signature": ""},
      {"type": "text", "text": "let me"},
      {"type": "tool_use", "id": "toolu_1", "name": "get", "input": {"city": "Paris"}},
      {"type": "tool_use", "id": "toolu_2", "name": "put", "input": {}}], "tool_use", None),
]


@pytest.mark.parametrize(("c", "content", "stop", "seq"), MESSAGES)
def test_message(c: Completion, content: list[dict[str, Any]], stop: str,
                 seq: str | None) -> None:
    d = message_from_completion(c, id="msg_1", model="m", usage=USAGE)
    assert d == {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                 "content": content, "stop_reason": stop, "stop_sequence": seq,
                 "usage": WIRE_USAGE}
    msg = anthropic.types.Message.model_validate(d)
    assert msg.model_dump(exclude_none=True) == without_none(d)


def test_message_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="not a JSON object"):
        message_from_completion(Completion("", None, (ToolCall("t", "f", "[]"),), "tool_calls"),
                                id="x", model="m", usage=USAGE)


def make_stream_events() -> list[tuple[str, dict[str, Any]]]:
    s = MessageStream()
    events = s.start("msg_1", "m", Usage(100, 0, 64))
    for step in (s.reasoning("thi"), s.reasoning("nk"), s.reasoning(""), s.text("let "),
                 s.ping(), s.text("me"), s.tool_call_start("toolu_1", "get"),
                 s.tool_args('{"city": '), s.tool_args('"Paris"}'),
                 s.tool_call_start("toolu_2", "put"), s.text(""),
                 s.finish("tool_calls", None, 7)):
        events.extend(step)
    return events


def test_stream_sequence() -> None:
    def block(i: int, b: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return ("content_block_start", {"type": "content_block_start", "index": i,
                                        "content_block": b})

    def delta(i: int, d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return ("content_block_delta", {"type": "content_block_delta", "index": i, "delta": d})

    def stop(i: int) -> tuple[str, dict[str, Any]]:
        return ("content_block_stop", {"type": "content_block_stop", "index": i})

    assert make_stream_events() == [
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {**WIRE_USAGE, "output_tokens": 0}}}),
        block(0, {"type": "thinking", "thinking": "", "signature": ""}),
        delta(0, {"type": "thinking_delta", "thinking": "thi"}),
        delta(0, {"type": "thinking_delta", "thinking": "nk"}),
        stop(0), block(1, {"type": "text", "text": ""}),
        delta(1, {"type": "text_delta", "text": "let "}),
        ("ping", {"type": "ping"}),
        delta(1, {"type": "text_delta", "text": "me"}),
        stop(1), block(2, {"type": "tool_use", "id": "toolu_1", "name": "get", "input": {}}),
        delta(2, {"type": "input_json_delta", "partial_json": '{"city": '}),
        delta(2, {"type": "input_json_delta", "partial_json": '"Paris"}'}),
        stop(2), block(3, {"type": "tool_use", "id": "toolu_2", "name": "put", "input": {}}),
        stop(3),
        ("message_delta", {"type": "message_delta",
                           "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                           "usage": {"output_tokens": 7}}),
        ("message_stop", {"type": "message_stop"})]


def test_stream_accumulates_to_the_message() -> None:
    """Every event validates as the SDK's stream event, and the SDK's own accumulator turns
    the stream into the non-streaming message of the same completion."""
    from anthropic.lib.streaming._messages import accumulate_event
    from pydantic import TypeAdapter

    adapter: Any = TypeAdapter(anthropic.types.RawMessageStreamEvent)
    snapshot = None
    bufs: dict[int, bytes] = {}
    for name, data in make_stream_events():
        if name == "ping":
            continue
        event = adapter.validate_python(data)
        assert event.type == name
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=bufs)
    c = Completion("let me", "think", (CALL, ToolCall("toolu_2", "put", "{}")), "tool_calls")
    assert snapshot is not None
    assert snapshot.model_dump(exclude_none=True) == without_none(message_from_completion(
        c, id="msg_1", model="m", usage=USAGE))


def test_stream_empty_and_misuse() -> None:
    s = MessageStream()
    s.start("m1", "m", USAGE)
    assert [n for n, _ in s.finish("length", None, 0)] == ["message_delta", "message_stop"]
    with pytest.raises(ValueError, match="without an open tool call"):
        MessageStream().tool_args("{")


@pytest.mark.parametrize(("status", "kind"), [
    (400, "invalid_request_error"), (401, "authentication_error"), (402, "billing_error"),
    (403, "permission_error"), (404, "not_found_error"), (413, "request_too_large"),
    (422, "invalid_request_error"), (429, "rate_limit_error"), (500, "api_error"),
    (502, "api_error"), (503, "overloaded_error"), (504, "timeout_error"),
    (529, "overloaded_error"),
])
def test_error_body(status: int, kind: str) -> None:
    body = anthropic_error_body(status, "nope")
    assert body == {"type": "error", "error": {"type": kind, "message": "nope"}}
    if kind != "request_too_large":  # documented by Anthropic, absent from the SDK's union
        parsed = anthropic.types.ErrorResponse.model_validate(body)
        assert parsed.error.type == kind


def test_request_body_merges_turns_and_refuses_system_turns() -> None:
    conv = Conversation(turns=(Turn("user", (Text("a"),)), Turn("user", (Text("b", True),))))
    assert messages_body_from_conversation(conv) == {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"},
                                     {"type": "text", "text": "b",
                                      "cache_control": {"type": "ephemeral"}}]}]}
    with pytest.raises(ValueError, match="system turn"):
        messages_body_from_conversation(Conversation(turns=(
            Turn("user", (Text("a"),)), Turn("system", (Text("s"),)))))
