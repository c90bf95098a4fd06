"""Conversations as Hugging Face chat-template messages, exact."""

from __future__ import annotations

from typing import Any

import pytest

from meshd.coordinator.gateway.dialects.model import (
    Conversation,
    Reasoning,
    Text,
    ToolCall,
    ToolResult,
    ToolSpec,
    Turn,
)
from meshd.coordinator.gateway.dialects.template import to_template_messages

CALL_A = ToolCall("a", "get", '{"city": "Paris"}')
CALL_B = ToolCall("b", "put", "{}", cache_hint=True)

CASES: list[tuple[Conversation, list[dict[str, Any]]]] = [
    (Conversation(turns=(Turn("user", (Text("hi"),)),)), [{"role": "user", "content": "hi"}]),
    (Conversation(system=(Text("s1", True), Text("s2")),
                  turns=(Turn("user", (Text("a"), Text("b"))),
                         Turn("system", (Text("later"),)))),
     [{"role": "system", "content": "s1\ns2"}, {"role": "user", "content": "a\nb"},
      {"role": "system", "content": "later"}]),
    (Conversation(turns=(
        Turn("user", (Text("q"),)),
        Turn("assistant", (Reasoning("think", "sig"), Reasoning("", "x", redacted=True),
                           Text("calling"), CALL_A, CALL_B)),
        Turn("user", (ToolResult("a", "rain", is_error=True), ToolResult("b", "", cache_hint=True),
                      Text("thanks"))),
        Turn("assistant", (ToolCall("c", "get", "{}"),)),
        Turn("user", (ToolResult("c", "sun"),)),
        Turn("assistant", (Text("prefill"),)))),
     [{"role": "user", "content": "q"},
      {"role": "assistant", "content": "calling", "reasoning_content": "think",
       "tool_calls": [
           {"id": "a", "type": "function",
            "function": {"name": "get", "arguments": {"city": "Paris"}}},
           {"id": "b", "type": "function", "function": {"name": "put", "arguments": {}}}]},
      {"role": "tool", "tool_call_id": "a", "content": "rain"},
      {"role": "tool", "tool_call_id": "b", "content": ""},
      {"role": "user", "content": "thanks"},
      {"role": "assistant", "content": "",
       "tool_calls": [{"id": "c", "type": "function",
                       "function": {"name": "get", "arguments": {}}}]},
      {"role": "tool", "tool_call_id": "c", "content": "sun"},
      {"role": "assistant", "content": "prefill"}]),
]


@pytest.mark.parametrize(("conv", "messages"), CASES)
def test_messages(conv: Conversation, messages: list[dict[str, Any]]) -> None:
    assert to_template_messages(conv) == (messages, None)


def test_tools() -> None:
    conv = Conversation(turns=(Turn("user", (Text("x"),)),), tools=(
        ToolSpec("get", "Get it.", '{"type": "object", "properties": {}}', strict=True),
        ToolSpec("bare")))
    assert to_template_messages(conv)[1] == [
        {"type": "function", "function": {"name": "get", "description": "Get it.",
                                          "parameters": {"type": "object", "properties": {}}}},
        {"type": "function", "function": {"name": "bare"}}]
