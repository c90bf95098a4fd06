"""Anthropic Messages bodies into `MessagesRequest`: exact parses and Anthropic's refusals."""

from __future__ import annotations

from typing import Any

import pytest

from meshd.api_errors import ApiError
from meshd.coordinator.gateway.config import Limits
from meshd.coordinator.gateway.dialects.anthropic import (
    MessagesRequest,
    MessagesSampling,
    parse_messages_request,
)
from meshd.coordinator.gateway.dialects.model import (
    Conversation,
    Reasoning,
    Text,
    ToolCall,
    ToolChoice,
    ToolResult,
    ToolSpec,
    Turn,
)

LIM = Limits()
U = {"role": "user", "content": "hi"}
EPH = {"type": "ephemeral"}
USE = {"type": "tool_use", "id": "toolu_1", "name": "get", "input": {"city": "Paris"}}
A_USE = {"role": "assistant", "content": [USE]}
RES = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "rain"}
U_RES = {"role": "user", "content": [RES]}
TOOLS = [{"name": "get", "input_schema": {"type": "object"}}]
HI = Turn("user", (Text("hi"),))


def make_body(*messages: Any, **kw: Any) -> dict[str, Any]:
    return {"model": "claude", "max_tokens": 64, "messages": list(messages or [U]), **kw}


def test_full_request() -> None:
    body = make_body(
        {"role": "user", "content": [{"type": "text", "text": "q"}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "text", "text": "calling", "citations": None}, {**USE, "cache_control": EPH},
            {"type": "tool_use", "id": "toolu_2", "name": "get", "input": {}}]},
        {"role": "user", "content": [
            {**RES, "is_error": True},
            {"type": "tool_result", "tool_use_id": "toolu_2", "cache_control": EPH,
             "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"type": "text", "text": "go on"}]},
        {"role": "assistant", "content": "The answer is"},
        system=[{"type": "text", "text": "sys", "cache_control": {**EPH, "ttl": "1h"}}],
        stop_sequences=["END", "\n\n"], temperature=0.5, top_p=1, top_k=40,
        metadata={"user_id": "u1"}, stream=True, thinking={"type": "disabled"},
        tools=[{"name": "get", "description": "Get.", "strict": True,
                "input_schema": {"type": "object", "properties": {}}, "cache_control": EPH},
               {"type": "custom", "name": "put", "input_schema": {"type": "object"}}],
        tool_choice={"type": "any", "disable_parallel_tool_use": True})
    conv = Conversation(
        (Text("sys", True),),
        (Turn("user", (Text("q"),)),
         Turn("assistant", (Reasoning("hmm", "sig"), Reasoning("", "opaque", redacted=True),
                            Text("calling"), ToolCall("toolu_1", "get", '{"city": "Paris"}', True),
                            ToolCall("toolu_2", "get", "{}"))),
         Turn("user", (ToolResult("toolu_1", "rain", True), ToolResult("toolu_2", "a\nb",
                                                                        cache_hint=True),
                       Text("go on"))),
         Turn("assistant", (Text("The answer is"),))),
        (ToolSpec("get", "Get.", '{"type": "object", "properties": {}}', True, True),
         ToolSpec("put", None, '{"type": "object"}')),
        ToolChoice("required"), parallel_tool_calls=False)
    assert parse_messages_request(body, LIM) == MessagesRequest(
        "claude", conv, MessagesSampling(64, 0.5, 1.0, 40, ("END", "\n\n")), True, "u1",
        "The answer is")
    conv.check_integrity()


@pytest.mark.parametrize(("messages", "turns", "prefill"), [
    ([U], (HI,), ""),
    ([U, {"role": "assistant", "content": ""}], (HI,), ""),
    ([U, {"role": "assistant", "content": []}], (HI,), ""),
    ([U, {"role": "assistant", "content": [{"type": "text", "text": "a"},
                                           {"type": "text", "text": "b"}]}],
     (HI, Turn("assistant", (Text("a"), Text("b")))), "a\nb"),
    ([U, A_USE, U_RES], (HI, Turn("assistant", (ToolCall("toolu_1", "get",
                                                         '{"city": "Paris"}'),)),
                         Turn("user", (ToolResult("toolu_1", "rain"),))), ""),
    ([U, A_USE, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1"}]}],
     (HI, Turn("assistant", (ToolCall("toolu_1", "get", '{"city": "Paris"}'),)),
      Turn("user", (ToolResult("toolu_1", ""),))), ""),
])
def test_turns_and_prefill(messages: list[Any], turns: tuple[Turn, ...], prefill: str) -> None:
    r = parse_messages_request(make_body(*messages), LIM)
    assert (r.conversation.turns, r.prefill) == (turns, prefill)
    assert r.conversation.system == () and r.sampling == MessagesSampling(64)


@pytest.mark.parametrize(("tool_choice", "choice", "parallel"), [
    ({"type": "auto"}, ToolChoice("auto"), True),
    ({"type": "none"}, ToolChoice("none"), True),
    ({"type": "tool", "name": "get", "disable_parallel_tool_use": False},
     ToolChoice("tool", "get"), True),
    ({"type": "auto", "disable_parallel_tool_use": True}, ToolChoice("auto"), False),
])
def test_tool_choice(tool_choice: dict[str, Any], choice: ToolChoice, parallel: bool) -> None:
    conv = parse_messages_request(make_body(tools=TOOLS, tool_choice=tool_choice),
                                  LIM).conversation
    assert (conv.tool_choice, conv.parallel_tool_calls) == (choice, parallel)


def text_block(t: str, **kw: Any) -> dict[str, Any]:
    return {"type": "text", "text": t, **kw}


FIVE_HINTS = [text_block(str(i), cache_control=EPH) for i in range(5)]
UNEXPECTED = "unexpected tool_use_id found in tool_result blocks"
# body, param, a part of the message
BAD: list[tuple[Any, str | None, str]] = [
    ([U], "body", "must be a JSON object"),
    ({**make_body(), "temperatur": 1, "n": 2}, "n", "Unknown or unsupported fields: n, temperatur"),
    ({**make_body(), "service_tier": "auto"}, "service_tier", "Unknown or unsupported"),
    ({"max_tokens": 5, "messages": [U]}, "model", "non-empty string"),
    ({"model": "m", "messages": [U]}, "max_tokens", "required"),
    (make_body(max_tokens=0), "max_tokens", "between 1 and 131072"),
    (make_body(max_tokens=131073), "max_tokens", "between 1 and 131072"),
    (make_body(max_tokens=5.0), "max_tokens", "integer"),
    (make_body(max_tokens=True), "max_tokens", "integer"),
    ({"model": "m", "max_tokens": 5, "messages": []}, "messages", "non-empty list"),
    (make_body(temperature=1.5), "temperature", "[0.0, 1.0]"),
    (make_body(temperature="1"), "temperature", "number"),
    (make_body(top_p=0), "top_p", "(0.0, 1.0]"),
    (make_body(top_k=0), "top_k", "integer between 1"),
    (make_body(top_k=-1), "top_k", "integer between 1"),
    (make_body(stop_sequences="END"), "stop_sequences", "must be a list"),
    (make_body(stop_sequences=[""]), "stop_sequences[0]", "non-empty string"),
    (make_body(stop_sequences=["a", "b", "c", "d", "e"]), "stop_sequences", "at most 4"),
    (make_body(stream="yes"), "stream", "boolean"),
    (make_body(metadata={"user_id": 5}), "metadata.user_id", "string"),
    (make_body(metadata={"session": "x"}), "metadata.session", "in 'metadata': session"),
    (make_body(metadata=[]), "metadata", "object"),
    (make_body(thinking={"type": "enabled", "budget_tokens": 1024}), "thinking.type",
     "meshd does not control reasoning budgets"),
    (make_body(thinking={"type": "adaptive"}), "thinking.type", "not supported"),
    (make_body(thinking={"type": "on"}), "thinking.type", "\"disabled\""),
    (make_body(system=5), "system", "must be a list"),
    (make_body(system=[{"type": "image"}]), "system[0].type", "\"text\""),
    (make_body(system=[text_block("")]), "system[0].text", "non-whitespace"),
    (make_body({"role": "system", "content": "x"}), "messages[0].role", "got 'system'"),
    (make_body(A_USE), "messages[0].role", "first message must use the \"user\" role"),
    (make_body(U, U), "messages[1].role", "messages[0] and messages[1] are both 'user'"),
    (make_body(U, {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}),
     "messages[2].role", "must alternate"),
    (make_body({"role": "user", "content": ""}), "messages[0].content", "non-whitespace"),
    (make_body({"role": "user", "content": "  \n"}), "messages[0].content", "non-whitespace"),
    (make_body({"role": "user", "content": []}), "messages[0].content", "must not be empty"),
    (make_body({"role": "user", "content": {"text": "x"}}), "messages[0].content", "a list"),
    (make_body(U, {"role": "assistant", "content": ""}, U), "messages[1].content",
     "non-whitespace"),
    (make_body(U, {"role": "assistant", "content": []}, U), "messages[1].content",
     "must not be empty"),
    (make_body(U, {"role": "assistant", "content": "ends with space "}), "messages[1]",
     "final assistant content cannot end with trailing whitespace"),
    (make_body(U, A_USE), "messages[1]", "is a prefill and may hold only text"),
    (make_body(U, {"role": "assistant", "content": [{"type": "thinking", "thinking": "t"}]}),
     "messages[1]", "only text"),
    (make_body({"role": "user", "content": [{"type": "image", "source": {}}]}),
     "messages[0].content[0].type", "'image' block is not supported; meshd serves text-only"),
    (make_body({"role": "user", "content": [{"type": "document"}]}),
     "messages[0].content[0].type", "not supported"),
    (make_body({"role": "user", "content": [USE]}), "messages[0].content[0].type",
     "tool_use blocks are only allowed in assistant messages"),
    (make_body(U, {"role": "assistant", "content": [RES]}), "messages[1].content[0].type",
     "tool_result blocks are only allowed in user messages"),
    (make_body({"role": "user", "content": [{"type": "thinking", "thinking": "x"}]}),
     "messages[0].content[0].type", "only allowed in assistant messages"),
    (make_body({"role": "user", "content": [{"type": "server_tool_use"}]}),
     "messages[0].content[0].type", "unknown or unsupported block type 'server_tool_use'"),
    (make_body({"role": "user", "content": ["hi"]}), "messages[0].content[0]", "object"),
    (make_body({"role": "user", "content": [text_block("x", cache_control={"type": "x"})]}),
     "messages[0].content[0].cache_control", "ephemeral"),
    (make_body({"role": "user", "content": FIVE_HINTS}), None,
     "A maximum of 4 blocks with cache_control may be provided. Found 5."),
    (make_body(U, {"role": "assistant", "content": [{**USE, "id": "bad id"}]}, U_RES),
     "messages[1].content[0].id", "^[a-zA-Z0-9_-]+$"),
    (make_body(U, {"role": "assistant", "content": [{**USE, "input": "{}"}]}, U_RES),
     "messages[1].content[0].input", "object"),
    (make_body(U, {"role": "assistant", "content": [{**USE, "name": ""}]}, U_RES),
     "messages[1].content[0].name", "non-empty"),
    (make_body(U, {"role": "assistant", "content": [USE, USE]}, U_RES),
     "messages[1]", "tool_use ids must be unique; toolu_1"),
    (make_body(U, {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "t", "cache_control": EPH}, text_block("x")]}, U),
     "messages[1].content[0].cache_control", "cannot be marked for caching"),
    (make_body(U, {"role": "assistant", "content": [{"type": "thinking", "thinking": 1}]}, U),
     "messages[1].content[0].thinking", "string"),
    (make_body(U, {"role": "assistant", "content": [{"type": "thinking", "thinking": "t",
                                                     "signature": 5}]}, U),
     "messages[1].content[0].signature", "string"),
    (make_body(U, {"role": "assistant", "content": [{"type": "redacted_thinking"}]}, U),
     "messages[1].content[0].data", "non-empty string"),
    (make_body(U_RES), "messages[0].content[0].tool_use_id", UNEXPECTED),
    (make_body(U, {"role": "assistant", "content": "a"}, U_RES),
     "messages[2].content[0].tool_use_id", UNEXPECTED + ": toolu_1. Each tool_result block"),
    (make_body(U, A_USE, {"role": "user", "content": [{**RES, "tool_use_id": "toolu_9"}]}),
     "messages[2].content[0].tool_use_id", UNEXPECTED + ": toolu_9"),
    (make_body(U, A_USE, U), "messages[2]",
     "tool_use ids were found without tool_result blocks immediately after: toolu_1"),
    (make_body(U, {"role": "assistant", "content": [USE, {**USE, "id": "toolu_2"}]}, U_RES),
     "messages[2]", "immediately after: toolu_2. Each tool_use block must have"),
    (make_body(U, A_USE, {"role": "user", "content": [RES, RES]}),
     "messages[2].content[1].tool_use_id", "more than one tool_result"),
    (make_body(U, A_USE, {"role": "user", "content": [text_block("x"), RES]}),
     "messages[2].content[1]", "tool_result blocks must come before any other content"),
    (make_body(U, A_USE, {"role": "user", "content": [{**RES, "tool_use_id": 1}]}),
     "messages[2].content[0].tool_use_id", "non-empty string"),
    (make_body(U, A_USE, {"role": "user", "content": [{**RES, "is_error": 1}]}),
     "messages[2].content[0].is_error", "boolean"),
    (make_body(U, A_USE, {"role": "user", "content": [{**RES, "content": [
        {"type": "image", "source": {}}]}]}),
     "messages[2].content[0].content[0].type", "not supported"),
    (make_body(U, A_USE, {"role": "user", "content": [{**RES, "content": [{"type": "x"}]}]}),
     "messages[2].content[0].content[0].type", "must be \"text\""),
    (make_body(U, A_USE, {"role": "user", "content": [{**RES, "content": 5}]}),
     "messages[2].content[0].content", "must be a list"),
    (make_body(tools={}), "tools", "must be a list"),
    (make_body(tools=[{"type": "web_search_20250305", "name": "web_search"}]), "tools[0].type",
     "server tool 'web_search_20250305' is not supported"),
    (make_body(tools=[{"name": "get"}]), "tools[0].input_schema", "object"),
    (make_body(tools=[{"name": "get", "input_schema": {"type": "array"}}]),
     "tools[0].input_schema.type", "\"object\""),
    (make_body(tools=[{"name": "get me", "input_schema": {"type": "object"}}]), "tools[0].name",
     "must match"),
    (make_body(tools=[*TOOLS, *TOOLS]), "tools[1].name", "'get' is defined twice"),
    (make_body(tools=[{**TOOLS[0], "description": 3}]), "tools[0].description", "string"),
    (make_body(tools=[{**TOOLS[0], "cache_control": {}}]), "tools[0].cache_control",
     "ephemeral"),
    (make_body(tool_choice="auto"), "tool_choice", "object"),
    (make_body(tool_choice={"type": "required"}), "tool_choice.type", "auto, any, tool, none"),
    (make_body(tool_choice={"type": "any"}), "tool_choice", "requires 'tools'"),
    (make_body(tools=TOOLS, tool_choice={"type": "tool"}), "tool_choice.name", "must match"),
    (make_body(tools=TOOLS, tool_choice={"type": "tool", "name": "put"}), "tool_choice.name",
     "no tool named 'put'"),
    (make_body(tools=TOOLS, tool_choice={"type": "auto", "x": 1}), "tool_choice.x",
     "in 'tool_choice': x"),
    (make_body(tools=TOOLS, tool_choice={"type": "auto", "disable_parallel_tool_use": 1}),
     "tool_choice.disable_parallel_tool_use", "boolean"),
]


@pytest.mark.parametrize(("body", "param", "message"), BAD)
def test_refused(body: Any, param: str | None, message: str) -> None:
    with pytest.raises(ApiError) as ei:
        parse_messages_request(body, LIM)
    assert (ei.value.status, ei.value.param) == (400, param)
    assert message in ei.value.message


def test_limits_apply() -> None:
    lim = Limits(max_tokens=10, max_stop=1)
    with pytest.raises(ApiError, match="between 1 and 10"):
        parse_messages_request(make_body(max_tokens=11), lim)
    with pytest.raises(ApiError, match="at most 1 sequences"):
        parse_messages_request(make_body(max_tokens=5, stop_sequences=["a", "b"]), lim)


def test_body_not_mutated() -> None:
    body = make_body(U, A_USE, U_RES, tools=TOOLS)
    before = repr(body)
    parse_messages_request(body, LIM)
    assert repr(body) == before
