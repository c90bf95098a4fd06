"""`<think>` reasoning (qwen3, deepseek_r1 styles) and reasoning-then-tools (exact values)."""

from __future__ import annotations

import pytest

from meshd.coordinator.gateway.tools import (
    ContentDelta,
    ParsedCall,
    ParsedOutput,
    ReasoningDelta,
    make_output_parser,
    make_reasoning_parser,
)

CASES = [
    # (name, qwen3 result, deepseek_r1 result)
    ("no markers", "Hello.", ParsedOutput("Hello."), ParsedOutput("", reasoning="Hello.")),
    ("empty", "", ParsedOutput(""), ParsedOutput("")),
    ("think block", "<think>\nPlan it.\n</think>\n\nAnswer.",
     ParsedOutput("\n\nAnswer.", reasoning="\nPlan it.\n"),
     ParsedOutput("\n\nAnswer.", reasoning="\nPlan it.\n")),
    ("leading whitespace before <think>", "\n <think>r</think>c",
     ParsedOutput("c", reasoning="r"), ParsedOutput("c", reasoning="r")),
    ("end only (template opened it)", "Plan.</think>Answer.",
     ParsedOutput("Plan.</think>Answer."), ParsedOutput("Answer.", reasoning="Plan.")),
    ("truncated reasoning", "<think>still thinking",
     ParsedOutput("", reasoning="still thinking"), ParsedOutput("", reasoning="still thinking")),
    ("empty think block", "<think>\n\n</think>\n\nHi",
     ParsedOutput("\n\nHi", reasoning="\n\n"), ParsedOutput("\n\nHi", reasoning="\n\n")),
    ("<think> not at the start", "Hi <think>x</think>",
     ParsedOutput("Hi <think>x</think>"), ParsedOutput("", reasoning="Hi <think>x")),
    ("second </think> is content", "<think>a</think>b</think>",
     ParsedOutput("b</think>", reasoning="a"), ParsedOutput("b</think>", reasoning="a")),
    ("partial start marker at the end", "<thi", ParsedOutput("<thi"),
     ParsedOutput("", reasoning="<thi")),
    ("partial end marker at the end", "<think>abc</thi",
     ParsedOutput("", reasoning="abc</thi"), ParsedOutput("", reasoning="abc</thi")),
    ("unicode", "<think>réfléchir 🤔</think>ok", ParsedOutput("ok", reasoning="réfléchir 🤔"),
     ParsedOutput("ok", reasoning="réfléchir 🤔")),
]


@pytest.mark.parametrize(("text", "qwen3", "r1"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_reasoning(text: str, qwen3: ParsedOutput, r1: ParsedOutput) -> None:
    assert make_reasoning_parser("qwen3").parse(text) == qwen3
    assert make_reasoning_parser("deepseek_r1").parse(text) == r1
    assert make_reasoning_parser("none").parse(text) == ParsedOutput(text)


CALL = '<tool_call>\n{"name": "search", "arguments": {"q": "meshd"}}\n</tool_call>'
SEARCH = ParsedCall("search", '{"q":"meshd"}')


@pytest.mark.parametrize(("tools", "reasoning", "text", "want"), [
    ("hermes", "qwen3", "<think>\nI should search.\n</think>\n\n" + CALL,
     ParsedOutput("", (SEARCH,), "\nI should search.\n")),
    ("hermes", "qwen3", "<think>maybe " + CALL + "</think>no call",
     ParsedOutput("no call", (), "maybe " + CALL)),
    ("hermes", "deepseek_r1", "Search first.</think>Sure." + CALL,
     ParsedOutput("Sure.", (SEARCH,), "Search first.")),
    ("llama3_json", "deepseek_r1", 'why</think>\n{"name": "search", "parameters": {"q": "meshd"}}',
     ParsedOutput("", (SEARCH,), "why")),
    ("none", "qwen3", "<think>r</think>" + CALL, ParsedOutput(CALL, (), "r")),
    ("hermes", "none", "<think>r</think>" + CALL, ParsedOutput("<think>r</think>", (SEARCH,))),
])
def test_reasoning_then_tools(tools: str, reasoning: str, text: str,
                              want: ParsedOutput) -> None:
    assert make_output_parser(tools, reasoning).parse(text) == want


def test_stream_holds_only_possible_markers() -> None:
    s = make_reasoning_parser("qwen3").stream()
    assert s.feed("<th") == []
    assert s.feed("ink>a<") == [ReasoningDelta("a")]
    assert s.feed("b") == [ReasoningDelta("<b")]
    assert s.feed("</think") == []
    assert s.feed(">c") == [ContentDelta("c")]
    assert s.feed("d") == [ContentDelta("d")]
    assert s.finish() == []
