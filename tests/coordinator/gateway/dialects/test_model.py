"""The internal model: its invariants, cache hints and completions as turns."""

from __future__ import annotations

import pytest

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
    arguments_object,
    cache_hint_count,
    cache_hint_prefix,
    completion_turn,
)

CALL = ToolCall("c1", "get", '{"a": 1}')
U = Turn("user", (Text("hi"),))
A_CALL = Turn("assistant", (Text("calling"), CALL))
RESULT = Turn("user", (ToolResult("c1", "ok"), Text("thanks")))


def make_conv(*turns: Turn, **kw: object) -> Conversation:
    return Conversation(turns=turns, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("conv", [
    make_conv(U),
    make_conv(U, A_CALL, RESULT, Turn("assistant", (Text("done"),))),
    make_conv(U, A_CALL),  # the last assistant turn's calls may stay open
    make_conv(U, Turn("system", (Text("later"),)), Turn("assistant", (Reasoning("r"),))),
    make_conv(Turn("user", (ToolResult("old", "x"),)), open_start=True),
    make_conv(Turn("system", (Text("dev"),)), U, open_start=True),
])
def test_integrity_holds(conv: Conversation) -> None:
    conv.check_integrity()


@pytest.mark.parametrize(("conv", "why"), [
    (make_conv(Turn("user", ())), "empty"),
    (make_conv(Turn("system", (Text("s"),))), "Conversation.system"),
    (make_conv(U, A_CALL, Turn("user", (Text("t"), ToolResult("c1", "ok")))), "text before"),
    (make_conv(U, A_CALL, Turn("user", (ToolResult("zz", "ok"),))), "unknown call ids"),
    (make_conv(U, A_CALL, Turn("user", (Text("no answer"),))), "calls unanswered"),
    (make_conv(Turn("user", (ToolResult("c1", "ok"),))), "results follow no call"),
    (make_conv(U, Turn("assistant", (CALL, CALL))), "duplicate call id"),
    (make_conv(U, Turn("assistant", (ToolCall("c", "f", "[1]"),))), "arguments"),
    (make_conv(U, Turn("assistant", (ToolResult("c", "x"),))), "assistant turn"),
    (make_conv(U, tools=(ToolSpec("f"), ToolSpec("f"))), "duplicate tool names"),
])
def test_integrity_fails(conv: Conversation, why: str) -> None:
    with pytest.raises(AssertionError, match=why):
        conv.check_integrity()


@pytest.mark.parametrize(("conv", "prefix", "count"), [
    (make_conv(U), 0, 0),
    (Conversation(system=(Text("s", True),), turns=(U,)), 1, 1),
    (Conversation(tools=(ToolSpec("f", cache_hint=True), ToolSpec("g")), system=(Text("s"),),
                  turns=(U,)), 1, 1),
    (Conversation(tools=(ToolSpec("f", cache_hint=True),), system=(Text("s", True),),
                  turns=(U, Turn("assistant", (Reasoning("r"), ToolCall("c1", "f", "{}", True))),
                         Turn("user", (ToolResult("c1", "x", cache_hint=True), Text("t"))))),
     6, 4),
])
def test_cache_hints(conv: Conversation, prefix: int, count: int) -> None:
    assert (cache_hint_prefix(conv), cache_hint_count(conv)) == (prefix, count)


@pytest.mark.parametrize(("c", "blocks"), [
    (Completion("hi"), (Text("hi"),)),
    (Completion(), (Text(""),)),
    (Completion("", "think"), (Reasoning("think"),)),
    (Completion("", None, (CALL,), "tool_calls"), (CALL,)),
    (Completion("t", "r", (CALL,), "tool_calls"), (Reasoning("r"), Text("t"), CALL)),
])
def test_completion_turn(c: Completion, blocks: tuple[object, ...]) -> None:
    assert completion_turn(c) == Turn("assistant", blocks)  # type: ignore[arg-type]


@pytest.mark.parametrize(("make", "match"), [
    (lambda: Completion(finish="stop_sequence"), "stop_sequence"),
    (lambda: Completion(finish="stop", stop_sequence="x"), "stop_sequence"),
    (lambda: ToolChoice("tool"), "name is required"),
    (lambda: ToolChoice("auto", "f"), "name is required"),
])
def test_value_checks(make: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()  # type: ignore[operator]


@pytest.mark.parametrize(("args", "ok"), [('{"a": [1]}', True), ("[]", False), ("{", False),
                                          ("", False), ("null", False)])
def test_arguments_object(args: str, ok: bool) -> None:
    call = ToolCall("c", "f", args)
    if ok:
        assert arguments_object(call) == {"a": [1]}
    else:
        with pytest.raises(ValueError, match="not a JSON object"):
            arguments_object(call)


def test_tool_spec_schema_is_fresh() -> None:
    spec = ToolSpec("f", parameters='{"type": "object"}')
    spec.schema()["x"] = 1  # type: ignore[index]
    assert spec.schema() == {"type": "object"} and ToolSpec("g").schema() is None
