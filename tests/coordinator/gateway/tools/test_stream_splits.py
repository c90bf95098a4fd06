"""Streaming equals parsing, however the output is split into deltas: every split point, random
chunkings and one character at a time, for each parser, over hand-picked outputs and a seeded
fuzz of marker fragments. The events are well formed and no text is lost."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import pytest

from meshd.coordinator.gateway.tools import (
    ArgsDelta,
    CallEnd,
    CallStart,
    ContentDelta,
    ParsedOutput,
    ReasoningDelta,
    StreamEvent,
    ToolParser,
    collect,
    make_output_parser,
)

COMBOS = [("hermes", "none"), ("llama3_json", "none"), ("none", "qwen3"),
          ("none", "deepseek_r1"), ("hermes", "qwen3"), ("llama3_json", "deepseek_r1")]

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "d": [1, {}]}}' \
       '\n</tool_call>'
OUTPUTS = [
    "",
    "Just text, no calls at all.",
    "Let me check.\n" + CALL,
    CALL + "\n" + CALL + "\n",
    '<tool_call>{"name": "echo", "arguments": {"s": "</tool_call> \\" \\\\ <tool_call>"}}'
    "</tool_call>after",
    'x <tool_call>{"name": "f", "arguments": {"a": 1,}}</tool_call> y ' + CALL,
    '<tool_call>{"name": "f", "arguments": {"a": 1}</tool_call>tail',
    'Sure. <tool_call>\n{"name": "f", "argu',
    "<tool_call <tool_call>[</tool_call> </tool_call> <tool_ca",
    '<|python_tag|>{"name": "a", "parameters": {"k": "v;"}}; {"name": "b", "arguments": {}}',
    ' {"name": "a", "parameters": {}} trailing',
    "<|python_tag is not here",
    "<think>\nShould I call?\n</think>\n\n" + CALL,
    "Plan.</think>Answer with <tool_call>",
    "<think>unterminated <tool_call>{}</tool_call> reasoning",
    "<th<think></thin</think>k>",
    "日本語 🙂 <tool_call>{\"name\": \"译\", \"arguments\": {\"t\": \"é\"}}</tool_call>",
]

FRAGMENTS = ["<tool_call>", "</tool_call>", "<tool_", "</", "<", "{", "}", "[", "]", '"', "\\",
             '"name"', ":", ",", '"f"', '"arguments"', "{}", " ", "\n", "a", "é", ";",
             "<think>", "</think>", "<|python_tag|>", '{"name": "f", "arguments": {"x": 1}}',
             '{"name": "g", "parameters": {}}']


BLOCKS = ['<tool_call>{"name": "f", "arguments": {"x": "</tool_call>"}}</tool_call>',
          '<tool_call>\n{"name": "g"}\n</tool_call>\n',
          '<think>why</think>', '{"name": "h", "parameters": {"y": [1]}}']


def make_fuzz(count: int, seed: int = 7) -> list[str]:
    """Outputs of words, whole blocks, blocks with a slice replaced by a fragment, and loose
    fragments."""
    rng = random.Random(seed)

    def piece() -> str:
        kind = rng.randrange(4)
        if kind == 0:
            return rng.choice(["ok", " ", "\n", "Hi there. ", "é🙂", "; "])
        block = rng.choice(BLOCKS)
        if kind == 1:
            return block
        if kind == 2:
            i = rng.randrange(len(block))
            return block[:i] + rng.choice(FRAGMENTS) + block[i + rng.randint(0, 3):]
        return rng.choice(FRAGMENTS)

    return ["".join(piece() for _ in range(rng.randint(1, 6))) for _ in range(count)]


def make_chunks(text: str, cuts: Sequence[int]) -> list[str]:
    edges = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(edges)]


def run_stream(parser: ToolParser, chunks: Sequence[str]) -> list[StreamEvent]:
    stream = parser.stream()
    events: list[StreamEvent] = []
    for chunk in chunks:
        events.extend(stream.feed(chunk))
    events.extend(stream.finish())
    return events


def check_well_formed(events: Sequence[StreamEvent]) -> None:
    """No empty deltas; each call is CallStart, ArgsDelta..., CallEnd, in index order, with
    nothing else in between."""
    open_call = None
    next_index = 0
    for e in events:
        if isinstance(e, ContentDelta | ReasoningDelta):
            assert e.text and open_call is None, e
        elif isinstance(e, CallStart):
            assert open_call is None and e.index == next_index and e.name, e
            open_call = e.index
        elif isinstance(e, ArgsDelta):
            assert e.index == open_call, e
        elif isinstance(e, CallEnd):
            assert e.index == open_call, e
            open_call, next_index = None, next_index + 1
    assert open_call is None


def check_nothing_lost(tools: str, reasoning: str, text: str, got: ParsedOutput) -> None:
    """Without calls, a tool parser's content is the whole text; a reasoning parser's
    reasoning and content, with the markers between, are the text (less whitespace before a
    leading `<think>`)."""
    if reasoning == "none" and not got.calls:
        assert got.content == text
    if tools != "none" or reasoning == "none":
        return
    head = text.lstrip()
    if head.startswith("<think>"):
        rest = head[len("<think>"):]
    elif reasoning == "deepseek_r1":
        rest = text
    else:
        assert got == ParsedOutput(text)
        return
    thought = got.reasoning or ""
    assert rest in (thought + got.content, thought + "</think>" + got.content)
    assert "</think>" not in thought


def check_splits(tools: str, reasoning: str, text: str, rng: random.Random,
                 every_point: bool) -> None:
    parser = make_output_parser(tools, reasoning)
    want = parser.parse(text)
    check_nothing_lost(tools, reasoning, text, want)
    splits: list[list[int]] = [list(range(1, len(text)))]  # one character at a time
    if every_point:
        splits += [[i] for i in range(len(text) + 1)]
    for _ in range(8):
        k = rng.randint(1, max(1, len(text) // 3))
        splits.append(sorted(rng.randint(0, len(text)) for _ in range(k)))
    for cuts in splits:
        events = run_stream(parser, make_chunks(text, cuts))
        check_well_formed(events)
        assert collect(events) == want, (cuts, events)


@pytest.mark.parametrize(("tools", "reasoning"), COMBOS)
@pytest.mark.parametrize("text", OUTPUTS, ids=[f"output{i}" for i in range(len(OUTPUTS))])
def test_every_split_equals_parse(tools: str, reasoning: str, text: str) -> None:
    check_splits(tools, reasoning, text, random.Random(text), every_point=True)


@pytest.mark.parametrize(("tools", "reasoning"), COMBOS)
def test_fuzzed_outputs(tools: str, reasoning: str) -> None:
    rng = random.Random(11)
    for text in make_fuzz(400):
        check_splits(tools, reasoning, text, rng, every_point=False)


def test_fuzz_reaches_calls_and_fallbacks() -> None:
    """The fuzz is not vacuous: it produces calls, malformed blocks and reasoning."""
    hermes = make_output_parser("hermes", "qwen3")
    results = [hermes.parse(t) for t in make_fuzz(400)]
    assert sum(bool(r.calls) for r in results) >= 10
    assert sum("<tool_call>" in r.content for r in results) >= 10
    assert sum(r.reasoning is not None for r in results) >= 5
