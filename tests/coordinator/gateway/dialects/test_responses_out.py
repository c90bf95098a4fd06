"""Responses objects and stream events, checked against the `openai` SDK's pydantic models."""

from __future__ import annotations

from typing import Any

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from meshd.coordinator.gateway.config import Limits
from meshd.coordinator.gateway.dialects.model import Completion, ToolCall, Usage
from meshd.coordinator.gateway.dialects.responses import parse_responses_request
from meshd.coordinator.gateway.dialects.responses_out import (
    ResponseStream,
    response_from_completion,
)

REQ = parse_responses_request({
    "model": "m", "input": "hi", "instructions": "be brief", "previous_response_id": "resp_0",
    "tools": [{"type": "function", "name": "get", "parameters": {"type": "object"}}],
    "tool_choice": "required", "temperature": 0.5, "max_output_tokens": 50,
    "metadata": {"k": "v"}}, Limits())
USAGE = Usage(prompt_tokens=100, completion_tokens=20, cached_tokens=64, reasoning_tokens=5)
CALL = ToolCall("call_1", "get", '{"a": 1}')
EVENTS: Any = TypeAdapter(ResponseStreamEvent)


def make_response(c: Completion) -> dict[str, Any]:
    return response_from_completion(c, REQ, id="resp_abc", model="m-1", created_at=1.5,
                                    usage=USAGE)


def test_response_object() -> None:
    d = make_response(Completion("hello", "why", (CALL,), "tool_calls"))
    assert d == {
        "id": "resp_abc", "object": "response", "created_at": 1.5, "status": "completed",
        "error": None, "incomplete_details": None, "instructions": "be brief",
        "max_output_tokens": 50, "model": "m-1", "parallel_tool_calls": True,
        "previous_response_id": "resp_0", "store": True, "temperature": 0.5, "top_p": None,
        "text": {"format": {"type": "text"}}, "tool_choice": "required",
        "tools": [{"type": "function", "name": "get", "description": None,
                   "parameters": {"type": "object"}, "strict": None}],
        "metadata": {"k": "v"}, "user": None,
        "output": [
            {"type": "reasoning", "id": "rs_abc_0", "summary": [], "status": "completed",
             "content": [{"type": "reasoning_text", "text": "why"}]},
            {"type": "message", "id": "msg_abc_1", "status": "completed", "role": "assistant",
             "content": [{"type": "output_text", "text": "hello", "annotations": []}]},
            {"type": "function_call", "id": "fc_abc_2", "call_id": "call_1", "name": "get",
             "arguments": '{"a": 1}', "status": "completed"}],
        "usage": {"input_tokens": 100,
                  "input_tokens_details": {"cached_tokens": 64, "cache_write_tokens": 0},
                  "output_tokens": 20, "output_tokens_details": {"reasoning_tokens": 5},
                  "total_tokens": 120}}
    r = Response.model_validate(d)
    assert r.usage is not None
    assert (r.output_text, r.usage.input_tokens_details.cached_tokens) == ("hello", 64)


@pytest.mark.parametrize(("c", "status", "kinds"), [
    (Completion("hi"), "completed", ["message"]),
    (Completion(), "completed", ["message"]),
    (Completion("cut", finish="length"), "incomplete", ["message"]),
    (Completion("", None, (CALL, ToolCall("call_2", "get", "{}")), "tool_calls"), "completed",
     ["function_call", "function_call"]),
    (Completion("", "r", (CALL,), "length"), "incomplete", ["reasoning", "function_call"]),
])
def test_status_and_items(c: Completion, status: str, kinds: list[str]) -> None:
    d = make_response(c)
    assert [i["type"] for i in d["output"]] == kinds
    assert d["status"] == d["output"][-1]["status"] == status
    assert all(i["status"] == "completed" for i in d["output"][:-1])
    assert d["incomplete_details"] == ({"reason": "max_output_tokens"}
                                       if status == "incomplete" else None)
    Response.model_validate(d)


def make_stream(steps: list[tuple[str, tuple[Any, ...]]], finish: str) -> list[Any]:
    s = ResponseStream(REQ, id="resp_abc", model="m-1", created_at=1.5)
    events = s.start()
    for method, args in steps:
        events.extend(getattr(s, method)(*args))
    events.extend(s.finish(finish, USAGE))  # type: ignore[arg-type]
    return events


STREAMS: list[tuple[list[tuple[str, tuple[Any, ...]]], str, Completion]] = [
    ([("reasoning", ("wh",)), ("reasoning", ("y",)), ("text", ("hel",)), ("text", ("",)),
      ("text", ("lo",)), ("tool_call_start", ("call_1", "get")), ("tool_args", ('{"a"',)),
      ("tool_args", (": 1}",))], "tool_calls", Completion("hello", "why", (CALL,), "tool_calls")),
    ([], "stop", Completion()),
    ([("text", ("cut",))], "length", Completion("cut", finish="length")),
    ([("tool_call_start", ("call_1", "get")), ("tool_args", ('{"a": 1}',)),
      ("tool_call_start", ("call_2", "get")), ("tool_args", ("{}",))], "tool_calls",
     Completion("", None, (CALL, ToolCall("call_2", "get", "{}")), "tool_calls")),
]


@pytest.mark.parametrize(("steps", "finish", "c"), STREAMS)
def test_stream_matches_the_response(steps: list[Any], finish: str, c: Completion) -> None:
    """Every event validates as the SDK's stream event with a dense sequence_number; the last
    carries exactly the non-streaming response; the SDK's stream state accepts the sequence."""
    from openai._types import omit
    from openai.lib.streaming.responses._responses import ResponseStreamState

    events = make_stream(steps, finish)
    state: Any = ResponseStreamState(input_tools=omit, text_format=omit)
    for seq, (name, data) in enumerate(events):
        assert (data["type"], data["sequence_number"]) == (name, seq)
        state.handle_event(EVENTS.validate_python(data))
    names = [n for n, _ in events]
    final = "response.incomplete" if c.finish == "length" else "response.completed"
    assert names[:2] == ["response.created", "response.in_progress"] and names[-1] == final
    assert events[0][1]["response"]["status"] == "in_progress"
    assert events[-1][1]["response"] == make_response(c)
    added = [d["item"]["id"] for n, d in events if n == "response.output_item.added"]
    done = [d["item"] for n, d in events if n == "response.output_item.done"]
    assert added == [i["id"] for i in done] and done == make_response(c)["output"]


def test_text_stream_events() -> None:
    events = make_stream([("text", ("a",)), ("text", ("b",))], "stop")
    where = {"item_id": "msg_abc_0", "output_index": 0, "content_index": 0}
    part = {"type": "output_text", "annotations": []}
    assert [(n, {k: v for k, v in d.items() if k not in ("response", "sequence_number")})
            for n, d in events[2:-1]] == [
        ("response.output_item.added", {"type": "response.output_item.added", "output_index": 0,
                                        "item": {"type": "message", "id": "msg_abc_0",
                                                 "status": "in_progress", "role": "assistant",
                                                 "content": []}}),
        ("response.content_part.added", {"type": "response.content_part.added", **where,
                                         "part": {**part, "text": ""}}),
        ("response.output_text.delta", {"type": "response.output_text.delta", **where,
                                        "delta": "a", "logprobs": []}),
        ("response.output_text.delta", {"type": "response.output_text.delta", **where,
                                        "delta": "b", "logprobs": []}),
        ("response.output_text.done", {"type": "response.output_text.done", **where,
                                       "text": "ab", "logprobs": []}),
        ("response.content_part.done", {"type": "response.content_part.done", **where,
                                        "part": {**part, "text": "ab"}}),
        ("response.output_item.done", {"type": "response.output_item.done", "output_index": 0,
                                       "item": {"type": "message", "id": "msg_abc_0",
                                                "status": "completed", "role": "assistant",
                                                "content": [{**part, "text": "ab"}]}})]


def test_tool_args_need_a_call() -> None:
    s = ResponseStream(REQ, id="resp_x", model="m", created_at=0)
    s.start()
    s.text("x")
    with pytest.raises(ValueError, match="without an open tool call"):
        s.tool_args("{}")
