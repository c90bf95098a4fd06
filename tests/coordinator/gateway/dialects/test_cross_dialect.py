"""A tool-call chain started in one dialect continues in another without loss.

Each row starts a conversation in one dialect, renders it out through a path of dialects and
parses it back each time; what the chain is made of (ids, names, arguments, results, is_error,
reasoning, cache hints, tools, tool choice) must survive every hop, and so must what the model
is shown (`to_template_messages`). Rows marked exact come back equal field by field; the others
lose only what their path documents (reasoning signatures in OpenAI chat, argument spacing
re-dumped by Anthropic)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from meshd.coordinator.gateway.config import Limits
from meshd.coordinator.gateway.dialects.anthropic import parse_messages_request
from meshd.coordinator.gateway.dialects.anthropic_out import (
    message_from_completion,
    messages_body_from_conversation,
)
from meshd.coordinator.gateway.dialects.model import (
    Completion,
    Conversation,
    Reasoning,
    ToolCall,
    Usage,
    completion_turn,
)
from meshd.coordinator.gateway.dialects.openai_chat import (
    chat_body_from_conversation,
    chat_message_from_completion,
    conversation_from_chat,
)
from meshd.coordinator.gateway.dialects.responses import (
    continue_conversation,
    conversation_after,
    parse_responses_request,
)
from meshd.coordinator.gateway.dialects.responses_out import (
    response_from_completion,
    responses_body_from_conversation,
)
from meshd.coordinator.gateway.dialects.template import to_template_messages

LIM = Limits()
EPH = {"type": "ephemeral"}


def make_anthropic(conv: Conversation) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 64, **messages_body_from_conversation(conv)}


def read_anthropic(body: dict[str, Any]) -> Conversation:
    return parse_messages_request(body, LIM).conversation


def read_chat(body: dict[str, Any]) -> Conversation:
    return conversation_from_chat(**body)


def read_responses(body: dict[str, Any]) -> Conversation:
    return parse_responses_request({"model": "m", **body}, LIM).conversation


DIALECTS: dict[str, tuple[Callable[[Conversation], dict[str, Any]],
                          Callable[[dict[str, Any]], Conversation]]] = {
    "anthropic": (make_anthropic, read_anthropic),
    "chat": (chat_body_from_conversation, read_chat),
    "responses": (responses_body_from_conversation, read_responses),
}


def facts(conv: Conversation) -> Any:
    """Everything a chain is made of; reasoning as its text per turn, arguments parsed."""
    def block(b: Any) -> Any:
        if isinstance(b, ToolCall):
            return ("call", b.id, b.name, json.loads(b.arguments), b.cache_hint)
        return b

    turns = [(t.role, "\n".join(r.text for r in t.reasoning() if r.text),
              tuple(block(b) for b in t.blocks if not isinstance(b, Reasoning)))
             for t in conv.turns]
    tools = [(s.name, s.description, s.schema(), s.cache_hint) for s in conv.tools]
    return conv.system, turns, tools, conv.tool_choice, conv.parallel_tool_calls


ANTHROPIC_CHAIN: dict[str, Any] = {
    "model": "m", "max_tokens": 64,
    "system": [{"type": "text", "text": "You are terse.", "cache_control": EPH}],
    "tools": [{"name": "get_weather", "description": "Weather by city.", "cache_control": EPH,
               "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
              {"name": "get_time", "input_schema": {"type": "object"}}],
    "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
    "messages": [
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Two tools needed.", "signature": "sig-1"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_01", "name": "get_weather",
             "input": {"city": "Paris", "unit": "C"}},
            {"type": "tool_use", "id": "toolu_02", "name": "get_time", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": "12C, rain"},
            {"type": "tool_result", "tool_use_id": "toolu_02", "is_error": True,
             "cache_control": EPH, "content": [{"type": "text", "text": "clock down"}]},
            {"type": "text", "text": "Retry the time."}]},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_03", "name": "get_time", "input": {"tz": "CET"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_03", "content": "14:02"}]},
        {"role": "assistant", "content": "It is"}]}

CHAT_CHAIN: dict[str, Any] = {
    "messages": [
        {"role": "developer", "content": "Use tools."},
        {"role": "user",
         "content": [{"type": "text", "text": "Sum 2 and 3", "cache_control": EPH}]},
        {"role": "assistant", "content": None, "reasoning_content": "Call add.",
         "tool_calls": [{"id": "call_a", "type": "function",
                         "function": {"name": "add", "arguments": '{"x": 2, "y": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "5"},
        {"role": "assistant", "content": "5."},
        {"role": "user", "content": "Now 5 times 4."},
        {"role": "assistant", "content": "Calling mul.", "tool_calls": [
            {"id": "call_b", "type": "function",
             "function": {"name": "mul", "arguments": '{"x":5,"y":4}'}}]},
        {"role": "tool", "tool_call_id": "call_b", "content": "20", "is_error": False}],
    "tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}},
              {"type": "function", "function": {"name": "mul", "description": "x*y",
                                                "parameters": {"type": "object"}}}],
    "tool_choice": {"type": "function", "function": {"name": "mul"}}}

RESPONSES_CHAIN: dict[str, Any] = {
    "model": "m",
    "input": [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "Find file sizes."},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "ls"}]},
        {"type": "function_call", "call_id": "call_1", "name": "ls", "arguments": '{"dir": "/"}'},
        {"type": "function_call", "call_id": "call_2", "name": "du", "arguments": '{"p": "/"}',
         "cache_control": EPH},
        {"type": "function_call_output", "call_id": "call_2", "output": "4K"},
        {"type": "function_call_output", "call_id": "call_1", "output": "denied",
         "is_error": True},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "ls failed.", "annotations": []}]},
        {"role": "user", "content": [{"type": "input_text", "text": "ok"}]}],
    "tools": [{"type": "function", "name": "ls", "parameters": {"type": "object"}},
              {"type": "function", "name": "du", "strict": True,
               "parameters": {"type": "object", "properties": {"p": {"type": "string"}}}}],
    "tool_choice": "required", "parallel_tool_calls": True}

# start dialect, start body, the dialects to pass through, exact
ROWS: list[tuple[str, dict[str, Any], list[str], bool]] = [
    ("anthropic", ANTHROPIC_CHAIN, ["responses", "anthropic"], True),
    ("anthropic", ANTHROPIC_CHAIN, ["chat"], False),  # signatures: chat has no place for them
    ("anthropic", ANTHROPIC_CHAIN, ["chat", "responses", "anthropic"], False),
    ("chat", CHAT_CHAIN, ["responses", "chat"], True),
    ("chat", CHAT_CHAIN, ["anthropic", "responses", "chat"], False),  # '{"x":5,...}' re-dumped
    ("responses", RESPONSES_CHAIN, ["chat", "responses"], True),
    ("responses", RESPONSES_CHAIN, ["anthropic", "chat", "responses"], True),
]


@pytest.mark.parametrize(("start", "body", "path", "exact"), ROWS)
def test_chain_survives(start: str, body: dict[str, Any], path: list[str], exact: bool) -> None:
    first = DIALECTS[start][1](body)
    first.check_integrity()
    conv = first
    for name in path:
        render, read = DIALECTS[name]
        conv = read(render(conv))
        conv.check_integrity()
        assert facts(conv) == facts(first), f"lost on the way through {name}"
        assert to_template_messages(conv) == to_template_messages(first)
    assert (conv == first) is exact


CALLS = (ToolCall("call_9", "get_time", '{"tz": "UTC"}'), ToolCall("call_8", "get_time", "{}"))
COMPLETIONS = [Completion("Let me check.", "Need the time.", CALLS, "tool_calls"),
               Completion("Done.", None), Completion("", "think", CALLS[:1], "tool_calls")]


def echo_anthropic(c: Completion) -> Any:
    msg = message_from_completion(c, id="msg_1", model="m", usage=Usage(1, 1))
    body = {**ANTHROPIC_CHAIN, "messages": [
        {"role": "user", "content": "q"}, {"role": msg["role"], "content": msg["content"]},
        {"role": "user", "content": [
            *[{"type": "tool_result", "tool_use_id": t.id} for t in c.tool_calls],
            {"type": "text", "text": "more"}]}]}
    return read_anthropic(body).turns[1]


def echo_chat(c: Completion) -> Any:
    return read_chat({"messages": [{"role": "user", "content": "q"},
                                   chat_message_from_completion(c),
                                   *[{"role": "tool", "tool_call_id": t.id, "content": "r"}
                                     for t in c.tool_calls]]}).turns[1]


def echo_responses(c: Completion) -> Any:
    req = parse_responses_request({"model": "m", "input": "q"}, LIM)
    out = response_from_completion(c, req, id="resp_1", model="m", created_at=0,
                                   usage=Usage(1, 1))["output"]
    return read_responses({"input": [{"role": "user", "content": "q"}, *out]}).turns[1]


@pytest.mark.parametrize("c", COMPLETIONS)
@pytest.mark.parametrize(("echo", "exact"), [(echo_anthropic, False), (echo_chat, True),
                                             (echo_responses, True)])
def test_response_comes_back_as_the_turn(echo: Callable[[Completion], Any], exact: bool,
                                         c: Completion) -> None:
    """A dialect's response, sent back as the next request's history, is the completion's turn
    (Anthropic: the thinking block comes back with meshd's empty signature)."""
    turn = completion_turn(c)
    back = echo(c)
    assert (back == turn) is (exact or not c.reasoning)
    assert [b for b in back.blocks if not isinstance(b, Reasoning)] == [
        b for b in turn.blocks if not isinstance(b, Reasoning)]
    assert [r.text for r in back.reasoning()] == [r.text for r in turn.reasoning()]


def test_anthropic_chain_continues_in_responses() -> None:
    """The model answers an Anthropic request with tool calls; the client continues with the
    Responses API and `previous_response_id`; the joined history renders back to Anthropic."""
    req = parse_messages_request({**ANTHROPIC_CHAIN, "messages": ANTHROPIC_CHAIN["messages"][:5]},
                                 LIM)
    c = Completion("", "One more call.", (ToolCall("toolu_04", "get_weather",
                                                   '{"city": "Lyon"}'),), "tool_calls")
    stored = conversation_after(req.conversation, c)
    nxt = parse_responses_request({"model": "m", "previous_response_id": "resp_1", "input": [
        {"type": "function_call_output", "call_id": "toolu_04", "output": "9C"},
        {"role": "user", "content": "Summarize."}]}, LIM)
    history = continue_conversation(stored, nxt.conversation)
    history.check_integrity()
    assert facts(read_anthropic(make_anthropic(history))) == facts(history)
    assert read_chat(chat_body_from_conversation(history)).turns[-1] == history.turns[-1]


def test_anthropic_fills_in_a_missing_schema() -> None:
    """The one loss on the way through Anthropic: `input_schema` is required there, so a tool
    declared without parameters comes back with the empty object schema."""
    conv = read_chat({"messages": [{"role": "user", "content": "x"}],
                      "tools": [{"type": "function", "function": {"name": "now"}}]})
    assert conv.tools[0].parameters is None
    assert read_anthropic(make_anthropic(conv)).tools[0].schema() == {"type": "object"}
