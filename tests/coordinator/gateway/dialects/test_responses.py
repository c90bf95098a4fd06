"""OpenAI Responses bodies into `ResponsesRequest`; `previous_response_id` continuation."""

from __future__ import annotations

from typing import Any

import pytest

from meshd.api_errors import ApiError
from meshd.coordinator.gateway.config import Limits
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
from meshd.coordinator.gateway.dialects.responses import (
    ResponsesRequest,
    continue_conversation,
    conversation_after,
    parse_responses_request,
    with_instructions,
)

LIM = Limits()
EPH = {"type": "ephemeral"}
FC = {"type": "function_call", "call_id": "call_1", "name": "get", "arguments": '{"q": 1}',
      "id": "fc_x", "status": "completed"}
OUT = {"type": "function_call_output", "call_id": "call_1", "output": "42"}
USER = {"role": "user", "content": "hi"}
CALL = ToolCall("call_1", "get", '{"q": 1}')
HI = Turn("user", (Text("hi"),))
TOOLS = [{"type": "function", "name": "get", "parameters": {"type": "object"}}]


def make_body(*items: Any, **kw: Any) -> dict[str, Any]:
    return {"model": "m", "input": list(items) if items else "hi", **kw}


def test_full_request() -> None:
    body = make_body(
        {"type": "message", "role": "developer", "content": "dev"},
        {"role": "system", "content": [{"type": "input_text", "text": "sys",
                                        "cache_control": EPH}]},
        USER,
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "s1"},
                                                        {"type": "summary_text", "text": "s2"}],
         "encrypted_content": "enc"},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "calling", "annotations": []}]},
        FC, {**FC, "call_id": "call_2", "arguments": "{}", "cache_control": EPH},
        {**OUT, "call_id": "call_2", "is_error": True,
         "output": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
        OUT, {"role": "user", "content": [{"type": "input_text", "text": "thanks"}]},
        {"type": "reasoning", "summary": [],
         "content": [{"type": "reasoning_text", "text": "raw"}]},
        {"type": "reasoning", "summary": []},  # nothing to carry: dropped
        instructions="be brief", max_output_tokens=100, temperature=1.5, top_p=0.9,
        stream=True, store=False, tools=[*TOOLS, {"type": "function", "name": "put",
                                                  "description": "P", "strict": True,
                                                  "parameters": None}],
        tool_choice={"type": "function", "name": "put"}, parallel_tool_calls=False,
        text={"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"},
                         "strict": True}},
        metadata={"k": "v"}, user="u1")
    conv = Conversation(
        (Text("dev"), Text("sys", True)),
        (HI, Turn("assistant", (Reasoning("s1\ns2", "enc"), Text("calling"), CALL,
                                ToolCall("call_2", "get", "{}", True))),
         Turn("user", (ToolResult("call_2", "a\nb", True), ToolResult("call_1", "42"),
                       Text("thanks"))),
         Turn("assistant", (Reasoning("raw"),))),
        (ToolSpec("get", None, '{"type": "object"}'), ToolSpec("put", "P", None, True)),
        ToolChoice("tool", "put"), parallel_tool_calls=False)
    assert parse_responses_request(body, LIM) == ResponsesRequest(
        "m", conv, "be brief", None, 100, 1.5, 0.9, True, False,
        {"type": "json_schema", "name": "out", "schema": {"type": "object"}, "strict": True},
        {"k": "v"}, "u1")
    conv.check_integrity()


def test_defaults() -> None:
    r = parse_responses_request(make_body(), LIM)
    assert r == ResponsesRequest("m", Conversation(turns=(HI,)))
    assert (r.store, r.stream, r.conversation.tool_choice) == (True, False, None)


def test_continuation() -> None:
    first = parse_responses_request(make_body(USER, instructions="old"), LIM)
    stored = conversation_after(first.conversation,
                                Completion("", "why", (CALL,), "tool_calls"))
    assert stored.turns == (HI, Turn("assistant", (Reasoning("why"), CALL)))
    nxt = parse_responses_request(make_body(
        OUT, {"role": "developer", "content": "now"}, previous_response_id="resp_1",
        instructions="new", tools=TOOLS), LIM)
    assert nxt.previous_response_id == "resp_1"
    assert nxt.conversation == Conversation(
        (), (Turn("user", (ToolResult("call_1", "42"),)), Turn("system", (Text("now"),))),
        (ToolSpec("get", None, '{"type": "object"}'),), open_start=True)
    nxt.conversation.check_integrity()
    history = continue_conversation(stored, nxt.conversation)
    assert history == Conversation((), (*stored.turns, *nxt.conversation.turns),
                                   nxt.conversation.tools)
    history.check_integrity()
    assert with_instructions(history, nxt.instructions).system == (Text("new"),)
    assert with_instructions(history, None) is history


STORED = Conversation(turns=(HI, Turn("assistant", (CALL, ToolCall("call_2", "f", "{}")))))


@pytest.mark.parametrize(("new", "message"), [
    (Conversation(turns=(Turn("user", (ToolResult("call_9", "x"),)),), open_start=True),
     "no tool call found for function call output with call_id call_9"),
    (Conversation(turns=(Turn("user", (ToolResult("call_1", "x"),)),), open_start=True),
     "No tool output found for function call call_2."),
    (Conversation(turns=(HI,), open_start=True), "No tool output found for function call "
                                                 "call_1, call_2."),
    (Conversation(turns=(Turn("user", (ToolResult("call_1", "x"), ToolResult("call_2", "y"))),
                         Turn("assistant", (CALL,))), open_start=True), "already used"),
])
def test_continuation_refused(new: Conversation, message: str) -> None:
    with pytest.raises(ApiError) as ei:
        continue_conversation(STORED, new)
    assert (ei.value.status, ei.value.param) == (400, "input")
    assert message in ei.value.message


def test_continuation_after_answered_calls() -> None:
    done = Conversation(turns=(HI, Turn("assistant", (Text("ok"),))))
    new = Conversation(turns=(Turn("user", (ToolResult("call_1", "x"),)),), open_start=True)
    with pytest.raises(ApiError, match="call_id call_1"):
        continue_conversation(done, new)
    assert continue_conversation(done, Conversation(turns=(HI,))).turns == (*done.turns, HI)


# body, param, a part of the message
BAD: list[tuple[Any, str | None, str]] = [
    ("hi", "body", "JSON object"),
    ({**make_body(), "reasoning": {"effort": "low"}}, "reasoning", "Unknown or unsupported"),
    ({"input": "hi"}, "model", "non-empty string"),
    (make_body(input=""), "input", "non-empty string or a non-empty list"),
    ({"model": "m"}, "input", "non-empty"),
    (make_body(input=[]), "input", "non-empty"),
    (make_body("hi"), "input[0]", "object"),
    (make_body({"content": "x"}), "input[0].type", "input item type None"),
    (make_body({"type": "web_search_call", "id": "w"}), "input[0].type",
     "'web_search_call' is not supported"),
    (make_body({"type": "item_reference", "id": "x"}), "input[0].type", "not supported"),
    (make_body({"role": "tool", "content": "x"}), "input[0].role", "got 'tool'"),
    (make_body({"role": "user", "content": []}), "input[0].content", "non-empty list"),
    (make_body({"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}),
     "input[0].content[0].type", "'input_image' is not supported; meshd serves text-only"),
    (make_body({"role": "user", "content": [{"type": "input_file"}]}),
     "input[0].content[0].type", "not supported"),
    (make_body({"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}),
     "input[0].content[0].type", "\"input_text\" or \"output_text\""),
    (make_body({"role": "user", "content": [{"type": "input_text"}]}),
     "input[0].content[0].text", "string"),
    (make_body(USER, {**FC, "arguments": "nope"}), "input[1].arguments", "not valid JSON"),
    (make_body(USER, {**FC, "arguments": "1"}), "input[1].arguments", "JSON object, got int"),
    (make_body(USER, {**FC, "call_id": ""}), "input[1].call_id", "non-empty"),
    (make_body(USER, {**FC, "name": None}), "input[1].name", "non-empty"),
    (make_body(USER, FC, FC), "input[2]", "call_1 is used twice"),
    (make_body(OUT), "input[0]", "no tool call found for function call output with call_id "
                                 "call_1"),
    (make_body(USER, {"role": "assistant", "content": "x"}, OUT), "input[2]",
     "no tool call found"),
    (make_body(USER, FC, {**OUT, "call_id": "call_9"}), "input[2].call_id", "call_id call_9"),
    (make_body(USER, FC, OUT, OUT), "input[3].call_id", "answered twice"),
    (make_body(USER, FC, USER), "input[2]", "No tool output found for function call call_1."),
    (make_body(USER, FC, OUT, USER, OUT), "input[4]", "no tool call found"),
    (make_body(USER, FC, {**OUT, "output": 5}), "input[2].output", "string or"),
    (make_body(USER, FC, {**OUT, "output": [{"type": "input_image"}]}),
     "input[2].output[0].type", "not supported"),
    (make_body(USER, FC, {**OUT, "is_error": "x"}), "input[2].is_error", "boolean"),
    (make_body(USER, {"type": "reasoning", "summary": [{"type": "text", "text": "x"}]}),
     "input[1].summary[0].type", "\"summary_text\""),
    (make_body(USER, {"type": "reasoning", "summary": "x"}), "input[1].summary", "list"),
    (make_body(USER, {"type": "reasoning", "content": [{"type": "reasoning_text"}]}),
     "input[1].content[0].text", "string"),
    (make_body(OUT, previous_response_id=5), "previous_response_id", "string"),
    (make_body(USER, OUT, previous_response_id="r"), "input[1]", "no tool call found"),
    (make_body(instructions=["x"]), "instructions", "string"),
    (make_body(max_output_tokens=0), "max_output_tokens", "between 1 and 131072"),
    (make_body(temperature=2.5), "temperature", "[0.0, 2.0]"),
    (make_body(top_p=0.0), "top_p", "(0.0, 1.0]"),
    (make_body(store="no"), "store", "boolean"),
    (make_body(stream=1), "stream", "boolean"),
    (make_body(parallel_tool_calls=0), "parallel_tool_calls", "boolean"),
    (make_body(user=1), "user", "string"),
    (make_body(tools=[{"type": "web_search"}]), "tools[0].type", "'web_search' is not supported"),
    (make_body(tools=[{"type": "function", "function": {"name": "get"}}]), "tools[0].name",
     "must match"),
    (make_body(tools=[*TOOLS, *TOOLS]), "tools[1].name", "defined twice"),
    (make_body(tools=[{**TOOLS[0], "parameters": "{}"}]), "tools[0].parameters", "JSON-schema"),
    (make_body(tools=[{**TOOLS[0], "strict": "yes"}]), "tools[0].strict", "boolean"),
    (make_body(tool_choice="any"), "tool_choice", "other tool choices are not supported"),
    (make_body(tools=TOOLS, tool_choice={"type": "file_search"}), "tool_choice",
     "not supported"),
    (make_body(tool_choice="required"), "tool_choice", "requires 'tools'"),
    (make_body(tools=TOOLS, tool_choice={"type": "function", "name": "x"}), "tool_choice.name",
     "no tool named 'x'"),
    (make_body(text="json"), "text", "object"),
    (make_body(text={"verbosity": "low"}), "text.verbosity", "Unknown or unsupported"),
    (make_body(text={"format": {"type": "yaml"}}), "text.format.type", "json_object"),
    (make_body(text={"format": {"type": "json_schema", "schema": {}}}), "text.format.name",
     "must match"),
    (make_body(text={"format": {"type": "json_schema", "name": "n"}}), "text.format.schema",
     "object"),
    (make_body(metadata={"k": 1}), "metadata.k", "values strings"),
    (make_body(metadata={"k" * 65: "v"}), "metadata." + "k" * 65, "at most 64"),
    (make_body(metadata={str(i): "v" for i in range(17)}), "metadata", "at most 16"),
]


@pytest.mark.parametrize(("body", "param", "message"), BAD)
def test_refused(body: Any, param: str | None, message: str) -> None:
    with pytest.raises(ApiError) as ei:
        parse_responses_request(body, LIM)
    assert (ei.value.status, ei.value.param) == (400, param)
    assert message in ei.value.message


@pytest.mark.parametrize("fmt", [{"type": "text"}, {"type": "json_object"}])
def test_simple_formats(fmt: dict[str, Any]) -> None:
    assert parse_responses_request(make_body(text={"format": fmt}), LIM).response_format == fmt
