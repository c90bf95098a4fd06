"""Llama 3.x JSON calls: all-or-nothing, `<|python_tag|>`, `;`-separated (exact values)."""

from __future__ import annotations

import pytest

from meshd.coordinator.gateway.tools import (
    ArgsDelta,
    CallEnd,
    CallStart,
    ContentDelta,
    ParsedCall,
    ParsedOutput,
    make_tool_parser,
)

A = ParsedCall("get_weather", '{"city":"Paris"}')
B = ParsedCall("get_time", '{"tz":"Europe/Oslo"}')
A_JSON = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
B_JSON = '{"name": "get_time", "arguments": {"tz": "Europe/Oslo"}}'

CASES = [
    ("plain text", "Paris is sunny today.", ParsedOutput("Paris is sunny today.")),
    ("empty", "", ParsedOutput("")),
    ("one call", A_JSON, ParsedOutput("", (A,))),
    ("whitespace around", "\n " + A_JSON + "\n", ParsedOutput("", (A,))),
    ("python tag", "<|python_tag|>" + A_JSON, ParsedOutput("", (A,))),
    ("python tag after whitespace", " <|python_tag|> " + A_JSON, ParsedOutput("", (A,))),
    ("two with ;", A_JSON + "; " + B_JSON, ParsedOutput("", (A, B))),
    ("three with tag and ;", "<|python_tag|>" + A_JSON + ";" + B_JSON + " ;\n" + A_JSON,
     ParsedOutput("", (A, B, A))),
    ("trailing ;", A_JSON + ";", ParsedOutput("", (A,))),
    ("arguments as a JSON string", '{"name": "f", "parameters": "{\\"a\\": [1]}"}',
     ParsedOutput("", (ParsedCall("f", '{"a":[1]}'),))),
    ("unicode and nesting", '{"name": "dire", "parameters": {"t": "ça 🙂", "o": {"l": [{}]}}}',
     ParsedOutput("", (ParsedCall("dire", '{"t":"ça 🙂","o":{"l":[{}]}}'),))),
    ("JSON that is not a call", '{"answer": 42}', ParsedOutput('{"answer": 42}')),
    ("name without parameters", '{"name": "Bob"}', ParsedOutput('{"name": "Bob"}')),
    ("both parameters and arguments", '{"name": "f", "parameters": {}, "arguments": {}}',
     ParsedOutput('{"name": "f", "parameters": {}, "arguments": {}}')),
    ("text after the call", A_JSON + " Let me know!", ParsedOutput(A_JSON + " Let me know!")),
    ("text before the call", "Sure: " + A_JSON, ParsedOutput("Sure: " + A_JSON)),
    ("one bad part spoils all", A_JSON + "; {\"name\": \"g\", \"parameters\": [1]}",
     ParsedOutput(A_JSON + '; {"name": "g", "parameters": [1]}')),
    ("truncated", '<|python_tag|>{"name": "f", "parame',
     ParsedOutput('<|python_tag|>{"name": "f", "parame')),
    ("brace but not JSON", "{curly} braces", ParsedOutput("{curly} braces")),
    ("tag alone", "<|python_tag|>", ParsedOutput("<|python_tag|>")),
    ("partial tag then text", "<|py is a snake", ParsedOutput("<|py is a snake")),
    ("only whitespace", "  ", ParsedOutput("  ")),
]


@pytest.mark.parametrize(("text", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parse(text: str, want: ParsedOutput) -> None:
    assert make_tool_parser("llama3_json").parse(text) == want


def test_text_streams_and_calls_wait_for_finish() -> None:
    text = make_tool_parser("llama3_json").stream()
    assert text.feed(" ") == []
    assert text.feed("<|") == []  # could still be the tag
    assert text.feed("no") == [ContentDelta(" <|no")]
    assert text.feed(" tools") == [ContentDelta(" tools")]
    assert text.finish() == []
    calls = make_tool_parser("llama3_json").stream()
    assert calls.feed(A_JSON[:10]) == []
    assert calls.feed(A_JSON[10:] + "; " + B_JSON) == []
    assert calls.finish() == [CallStart(0, A.name), ArgsDelta(0, A.arguments), CallEnd(0),
                              CallStart(1, B.name), ArgsDelta(1, B.arguments), CallEnd(1)]
