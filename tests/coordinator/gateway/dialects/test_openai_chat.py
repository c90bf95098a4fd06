"""OpenAI chat messages <-> the internal model: exact parses, refusals, renders, responses."""

from __future__ import annotations

from typing import Any

import pytest

from meshd.api_errors import ApiError
from meshd.coordinator.gateway.dialects.model import (
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
from meshd.coordinator.gateway.dialects.openai_chat import (
    chat_body_from_conversation,
    chat_finish_reason,
    chat_message_from_completion,
    conversation_from_chat,
)

U = {"role": "user", "content": "hi"}
FN = {"name": "get", "arguments": '{"city":"Paris"}'}
A_CALL = {"role": "assistant", "content": None,
          "tool_calls": [{"id": "c1", "type": "function", "function": FN}]}
TOOL = {"role": "tool", "tool_call_id": "c1", "content": "rain"}
TOOLS = [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}]
CALL = ToolCall("c1", "get", '{"city":"Paris"}')


def make_turns(*turns: Turn) -> tuple[Turn, ...]:
    return turns


PARSES: list[tuple[list[Any], Conversation]] = [
    ([{"role": "developer", "content": "d"}, {"role": "system", "content": [
        {"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}]}, U],
     Conversation((Text("d"), Text("s", True)), make_turns(Turn("user", (Text("hi"),))))),
    ([U, {"role": "system", "content": "mid"}, U, U],
     Conversation((), make_turns(Turn("user", (Text("hi"),)), Turn("system", (Text("mid"),)),
                                 Turn("user", (Text("hi"),)), Turn("user", (Text("hi"),))))),
    ([U, A_CALL, TOOL, U],
     Conversation((), make_turns(Turn("user", (Text("hi"),)), Turn("assistant", (CALL,)),
                                 Turn("user", (ToolResult("c1", "rain"), Text("hi")))))),
    ([U, {"role": "assistant", "content": "", "reasoning_content": "r", "tool_calls": [
        {"id": "c1", "function": FN, "cache_control": {"type": "ephemeral"}},
        {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "c2", "is_error": True,
       "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b",
                                                   "cache_control": {"type": "ephemeral"}}]},
      TOOL, {"role": "assistant", "content": [{"type": "text", "text": "x"}],
             "reasoning": "vllm-style"}],
     Conversation((), make_turns(
         Turn("user", (Text("hi"),)),
         Turn("assistant", (Reasoning("r"), ToolCall("c1", "get", FN["arguments"], True),
                            ToolCall("c2", "f", "{}"))),
         Turn("user", (ToolResult("c2", "a\nb", True, True), ToolResult("c1", "rain"))),
         Turn("assistant", (Reasoning("vllm-style"), Text("x"),)),
     ))),
    ([U, {"role": "assistant", "content": ""}, {"role": "assistant", "content": None,
                                                "reasoning_content": "only"}],
     Conversation((), make_turns(Turn("user", (Text("hi"),)), Turn("assistant", (Text(""),)),
                                 Turn("assistant", (Reasoning("only"),))))),
    ([U, A_CALL], Conversation((), make_turns(Turn("user", (Text("hi"),)),
                                              Turn("assistant", (CALL,))))),
]


@pytest.mark.parametrize(("messages", "conv"), PARSES)
def test_parse(messages: list[Any], conv: Conversation) -> None:
    got = conversation_from_chat(messages)
    assert got == conv
    got.check_integrity()
    body = chat_body_from_conversation(got)
    assert conversation_from_chat(body["messages"]) == conv  # renders back to the same


def test_tools_and_choice() -> None:
    tools = [*TOOLS, {"type": "function", "cache_control": {"type": "ephemeral"},
                      "function": {"name": "put", "description": "P", "strict": True}}]
    conv = conversation_from_chat([U], tools, {"type": "function", "function": {"name": "put"}},
                                  False)
    assert conv.tools == (ToolSpec("get", None, '{"type": "object"}'),
                          ToolSpec("put", "P", None, True, True))
    assert (conv.tool_choice, conv.parallel_tool_calls) == (ToolChoice("tool", "put"), False)
    body = chat_body_from_conversation(conv)
    assert body["tools"] == tools and body["parallel_tool_calls"] is False
    assert body["tool_choice"] == {"type": "function", "function": {"name": "put"}}
    assert conversation_from_chat(**body) == conv
    for mode in ("auto", "none", "required"):
        assert conversation_from_chat([U], TOOLS, mode).tool_choice == ToolChoice(mode)
    assert conversation_from_chat([U], None, "none").tool_choice == ToolChoice("none")


def chat(*messages: Any, **kw: Any) -> dict[str, Any]:
    return {"messages": list(messages), **kw}


# body, param, a part of the message ("accepted...": no error)
BAD: list[tuple[dict[str, Any], str | None, str]] = [
    (chat(), "messages", "non-empty list"),
    ({"messages": "hi"}, "messages", "non-empty list"),
    (chat("hi"), "messages[0]", "must be an object"),
    (chat({"role": "bot", "content": "x"}), "messages[0].role", "got 'bot'"),
    (chat({"role": "function", "name": "f", "content": "x"}), "messages[0]", "legacy"),
    (chat(U, {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}),
     "messages[1]", "legacy"),
    (chat({"role": "user"}), "messages[0].content", "must be a string or"),
    (chat({"role": "user", "content": []}), "messages[0].content", "non-empty list of text"),
    (chat({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}),
     "messages[0].content[0].type", "not supported; meshd serves text-only models"),
    (chat({"role": "user", "content": [{"type": "input_audio"}]}),
     "messages[0].content[0].type", "not supported"),
    (chat({"role": "user", "content": [{"type": "texts", "text": "x"}]}),
     "messages[0].content[0].type", "must be a text part"),
    (chat({"role": "user", "content": [{"type": "text", "text": 3}]}),
     "messages[0].content[0].text", "must be a string"),
    (chat({"role": "user", "content": [{"type": "text", "text": "x",
                                        "cache_control": {"type": "persistent"}}]}),
     "messages[0].content[0].cache_control", "ephemeral"),
    (chat({"role": "user", "content": [{"type": "text", "text": "x",
                                        "cache_control": {"type": "ephemeral", "ttl": "2h"}}]}),
     "messages[0].content[0].cache_control.ttl", "5m"),
    (chat(U, {"role": "assistant"}), "messages[1].content", "required unless"),
    (chat(U, {"role": "assistant", "content": None, "tool_calls": {}}),
     "messages[1].tool_calls", "must be a list"),
    (chat(U, {"role": "assistant", "content": None, "tool_calls": [{"function": FN}]}),
     "messages[1].tool_calls[0].id", "non-empty string"),
    (chat(U, {"role": "assistant", "content": None,
              "tool_calls": [{"id": "c", "type": "custom", "function": FN}]}),
     "messages[1].tool_calls[0].type", "function"),
    (chat(U, {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}),
     "messages[1].tool_calls[0].function", "must be an object"),
    (chat(U, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": "{"}}]}),
     "messages[1].tool_calls[0].function.arguments", "not valid JSON"),
    (chat(U, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": "[1]"}}]}),
     "messages[1].tool_calls[0].function.arguments", "JSON object, got list"),
    (chat(U, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": {"a": 1}}}]}),
     "messages[1].tool_calls[0].function.arguments", "string holding a JSON object"),
    (chat(U, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "function": {"name": "", "arguments": "{}"}}]}),
     "messages[1].tool_calls[0].function.name", "non-empty"),
    (chat(U, A_CALL, TOOL, A_CALL), "messages[3]", "c1 is used twice"),
    (chat(U, TOOL), "messages[1]", "must follow an assistant message with 'tool_calls'"),
    (chat(U, A_CALL, U, TOOL), "messages[2]", "did not have response messages: c1"),
    (chat(U, A_CALL, TOOL, U, TOOL), "messages[4]", "must follow an assistant message"),
    (chat(U, A_CALL, {**TOOL, "tool_call_id": "c9"}), "messages[2].tool_call_id",
     "(c9) answers no tool call"),
    (chat(U, A_CALL, TOOL, TOOL), "messages[3].tool_call_id", "answered twice"),
    (chat(U, A_CALL, {"role": "tool", "content": "x"}), "messages[2].tool_call_id",
     "non-empty string"),
    (chat(U, A_CALL, {**TOOL, "is_error": "yes"}), "messages[2].is_error", "boolean"),
    (chat(U, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "function": FN}, {"id": "b", "function": FN}]},
        {**TOOL, "tool_call_id": "a"}), None, "accepted: calls may stay open at the end"),
    (chat(U, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "function": FN}, {"id": "b", "function": FN}]},
        {**TOOL, "tool_call_id": "a"}, {"role": "assistant", "content": "x"}),
     "messages[3]", "response messages: b"),
    (chat(U, {"role": "assistant", "content": "x", "reasoning_content": 5}),
     "messages[1].reasoning_content", "must be a string"),
    (chat(U, tools={}), "tools", "must be a list"),
    (chat(U, tools=[{"type": "web_search"}]), "tools[0].type", "'web_search' is not supported"),
    (chat(U, tools=[{"type": "function", "function": {"name": "a b"}}]),
     "tools[0].function.name", "^[a-zA-Z0-9_-]{1,64}$"),
    (chat(U, tools=[{"type": "function", "function": {"name": "x" * 65}}]),
     "tools[0].function.name", "must match"),
    (chat(U, tools=[*TOOLS, *TOOLS]), "tools[1].function.name", "defined twice"),
    (chat(U, tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]),
     "tools[0].function.parameters", "JSON-schema object"),
    (chat(U, tools=[{"type": "function", "function": {"name": "f", "strict": 1}}]),
     "tools[0].function.strict", "boolean"),
    (chat(U, tools=[{"type": "function", "function": {"name": "f", "description": 1}}]),
     "tools[0].function.description", "string"),
    (chat(U, tool_choice="any"), "tool_choice", "must be \"auto\""),
    (chat(U, tool_choice="required"), "tool_choice", "requires 'tools'"),
    (chat(U, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice.function.name", "no tool named 'nope' is defined (tools: get)"),
    (chat(U, tools=TOOLS, tool_choice={"type": "function", "function": {}}),
     "tool_choice.function.name", "non-empty string"),
    (chat(U, parallel_tool_calls="no"), "parallel_tool_calls", "boolean"),
]


@pytest.mark.parametrize(("body", "param", "message"), BAD)
def test_refused(body: dict[str, Any], param: str | None, message: str) -> None:
    if message.startswith("accepted"):
        conversation_from_chat(**body)
        return
    with pytest.raises(ApiError) as ei:
        conversation_from_chat(**body)
    assert (ei.value.status, ei.value.param) == (400, param)
    assert message in ei.value.message


CALLS = (ToolCall("c1", "get", '{"a": 1}'), ToolCall("c2", "put", "{}"))
OUT: list[tuple[Completion, dict[str, Any], str]] = [
    (Completion("hi"), {"role": "assistant", "content": "hi"}, "stop"),
    (Completion(), {"role": "assistant", "content": ""}, "stop"),
    (Completion("", "why", CALLS, "tool_calls"),
     {"role": "assistant", "content": None, "reasoning_content": "why", "tool_calls": [
         {"id": "c1", "type": "function", "function": {"name": "get", "arguments": '{"a": 1}'}},
         {"id": "c2", "type": "function", "function": {"name": "put", "arguments": "{}"}}]},
     "tool_calls"),
    (Completion("t", None, CALLS[:1], "length"),
     {"role": "assistant", "content": "t", "tool_calls": [
         {"id": "c1", "type": "function", "function": {"name": "get", "arguments": '{"a": 1}'}}]},
     "length"),
    (Completion("t", finish="stop_sequence", stop_sequence="END"),
     {"role": "assistant", "content": "t"}, "stop"),
]


@pytest.mark.parametrize(("c", "message", "finish"), OUT)
def test_completion_message(c: Completion, message: dict[str, Any], finish: str) -> None:
    assert chat_message_from_completion(c) == message
    assert chat_finish_reason(c) == finish
    from openai.types.chat import ChatCompletion

    resp = ChatCompletion.model_validate({
        "id": "x", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": finish,
                     "logprobs": None}]})
    assert resp.choices[0].message.content == message["content"]
