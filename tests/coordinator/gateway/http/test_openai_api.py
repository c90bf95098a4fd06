"""Table-driven validation of request bodies into typed requests."""

from __future__ import annotations

from typing import Any

import pytest

from meshd.coordinator.gateway.http.errors import ApiError
from meshd.coordinator.gateway.http.openai_api import (
    ChatMessage,
    Limits,
    Sampling,
    parse_chat,
    parse_completion,
)

LIM = Limits()
U = {"role": "user", "content": "hi"}


def make_chat(**kw: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [U], **kw}


CALL = {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def test_chat_normalized() -> None:
    r = parse_chat(make_chat(
        messages=[{"role": "system", "content": [{"type": "text", "text": "a"},
                                                 {"type": "text", "text": "b"}]},
                  {"role": "assistant", "content": None, "tool_calls": [CALL]},
                  {"role": "tool", "content": "x", "tool_call_id": "1"}],
        stream=True, stream_options={"include_usage": True}, n=2, stop="END", seed=7,
        temperature=0, top_p=1, max_tokens=5, max_completion_tokens=9, logprobs=True,
        top_logprobs=20, user="u", tools=[{"type": "function", "function": {"name": "f"}}],
        tool_choice="auto",
        response_format={"type": "json_object"}, min_p=0.1), LIM)
    assert r.messages == (ChatMessage("system", "a\nb"),
                          ChatMessage("assistant", None, tool_calls=[CALL]),
                          ChatMessage("tool", "x", tool_call_id="1"))
    assert r.sampling == Sampling(n=2, stop=("END",), seed=7, temperature=0.0, top_p=1.0,
                                  max_tokens=9)
    assert (r.stream, r.include_usage, r.logprobs, r.top_logprobs) == (True, True, True, 20)
    assert r.response_format == {"type": "json_object"} and r.extra == {"min_p": 0.1}
    # tools and a tool-call chain: the structured conversation the prompt is rendered from
    assert r.conversation is not None and [t.role for t in r.conversation.turns] == [
        "assistant", "user"]
    assert r.conversation.turns[0].blocks[0].id == "1"


def test_completion_normalized() -> None:
    r = parse_completion({"model": "m", "prompt": [1, 2], "logprobs": 5, "echo": True}, LIM)
    assert r.prompt == (1, 2) and r.logprobs == 5 and r.extra == {"echo": True}
    assert parse_completion({"model": "m", "prompt": "p"}, LIM).sampling == Sampling()


@pytest.mark.parametrize(("body", "param"), [
    (make_chat(n=0), "n"),
    (make_chat(n=129), "n"),
    (make_chat(temperature=-0.1), "temperature"),
    (make_chat(top_p=1.01), "top_p"),
    (make_chat(stop=None, seed=2**64), "seed"),
    (make_chat(user=3), "user"),
    (make_chat(tool_choice=3), "tool_choice"),
    (make_chat(response_format="json"), "response_format"),
    (make_chat(stream=True, stream_options={"include_usage": 1}), "stream_options.include_usage"),
    (make_chat(messages=[{"role": "tool", "content": "x"}]), "messages[0].tool_call_id"),
    (make_chat(messages=[{"role": "user"}]), "messages[0].content"),
    (make_chat(model=""), "model"),
])
def test_chat_rejects(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as ei:
        parse_chat(body, LIM)
    assert ei.value.status == 400 and ei.value.param == param


def test_absurd_max_tokens_uses_limit() -> None:
    with pytest.raises(ApiError, match="131072"):
        parse_completion({"model": "m", "prompt": "x", "max_tokens": 10**9}, LIM)
    assert parse_completion({"model": "m", "prompt": "x", "max_tokens": 10**9},
                            Limits(max_tokens=10**9)).sampling.max_tokens == 10**9
