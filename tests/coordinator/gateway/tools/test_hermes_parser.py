"""Hermes `<tool_call>` blocks: content, calls, malformed blocks as content (exact values)."""

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
from meshd.coordinator.gateway.tools.hermes import hermes_call

W = ParsedCall("get_weather", '{"city":"Paris","unit":"c"}')
WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}' \
          '\n</tool_call>'

CASES = [
    ("no calls", "The sky is blue.", ParsedOutput("The sky is blue.")),
    ("empty", "", ParsedOutput("")),
    ("whitespace only", " \n", ParsedOutput(" \n")),
    ("only a call", WEATHER, ParsedOutput("", (W,))),
    ("text then call", "Let me check.\n" + WEATHER, ParsedOutput("Let me check.\n", (W,))),
    ("leading and trailing whitespace dropped", "\n\n" + WEATHER + "\n",
     ParsedOutput("", (W,))),
    ("two calls", WEATHER + "\n" + WEATHER.replace("Paris", "Oslo"),
     ParsedOutput("", (W, ParsedCall("get_weather", '{"city":"Oslo","unit":"c"}')))),
    ("text after a call is content", WEATHER + "\n\nDone.", ParsedOutput("\n\nDone.", (W,))),
    ("text between calls", "a" + WEATHER + " b " + WEATHER,
     ParsedOutput("a b ", (W, W))),
    ("compact block", '<tool_call>{"name":"f","arguments":{}}</tool_call>',
     ParsedOutput("", (ParsedCall("f", "{}"),))),
    ("no arguments means {}", '<tool_call>{"name": "now"}</tool_call>',
     ParsedOutput("", (ParsedCall("now", "{}"),))),
    ("arguments as a JSON string", '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}'
     '</tool_call>', ParsedOutput("", (ParsedCall("f", '{"a":1}'),))),
    ("end marker inside a string",
     '<tool_call>{"name": "echo", "arguments": {"s": "</tool_call> {\\"x\\": [1, {}]}"}}'
     '</tool_call>',
     ParsedOutput("", (ParsedCall("echo", '{"s":"</tool_call> {\\"x\\": [1, {}]}"}'),))),
    ("nested arguments", '<tool_call>{"name": "q", "arguments": {"f": {"and": [{"k": 1}, '
     '{"k": [true, null, 2.5]}]}}}</tool_call>',
     ParsedOutput("", (ParsedCall("q", '{"f":{"and":[{"k":1},{"k":[true,null,2.5]}]}}'),))),
    ("unicode", 'Voilà <tool_call>{"name": "traduire", "arguments": {"texte": "日本語 🙂", '
     '"e": "\\u00e9"}}</tool_call>',
     ParsedOutput("Voilà ", (ParsedCall("traduire", '{"texte":"日本語 🙂","e":"é"}'),))),
    ("malformed JSON is content",
     'x <tool_call>{"name": "f", "arguments": {"a": 1,}}</tool_call> y',
     ParsedOutput('x <tool_call>{"name": "f", "arguments": {"a": 1,}}</tool_call> y')),
    ("missing brace is content up to its marker",
     '<tool_call>{"name": "f", "arguments": {"a": 1}</tool_call>' + WEATHER,
     ParsedOutput('<tool_call>{"name": "f", "arguments": {"a": 1}</tool_call>', (W,))),
    ("not an object", "<tool_call>[1, 2]</tool_call>",
     ParsedOutput("<tool_call>[1, 2]</tool_call>")),
    ("no name", '<tool_call>{"arguments": {}}</tool_call>',
     ParsedOutput('<tool_call>{"arguments": {}}</tool_call>')),
    ("arguments not an object", '<tool_call>{"name": "f", "arguments": 3}</tool_call>',
     ParsedOutput('<tool_call>{"name": "f", "arguments": 3}</tool_call>')),
    ("text after the object", '<tool_call>{"name": "f"} oops</tool_call>!',
     ParsedOutput('<tool_call>{"name": "f"} oops</tool_call>!')),
    ("NaN is not JSON", '<tool_call>{"name": "f", "arguments": {"a": NaN}}</tool_call>',
     ParsedOutput('<tool_call>{"name": "f", "arguments": {"a": NaN}}</tool_call>')),
    ("empty block", "<tool_call></tool_call>", ParsedOutput("<tool_call></tool_call>")),
    ("unterminated block at the end", 'Sure. <tool_call>\n{"name": "f", "argu',
     ParsedOutput('Sure. <tool_call>\n{"name": "f", "argu')),
    ("complete JSON, no end marker", WEATHER + '<tool_call>{"name": "f"}',
     ParsedOutput('<tool_call>{"name": "f"}', (W,))),
    ("marker prefix at the end", "Hmm <tool_ca", ParsedOutput("Hmm <tool_ca")),
    ("a lone end marker is content", "a </tool_call> b", ParsedOutput("a </tool_call> b")),
    ("malformed then whitespace kept", '\n<tool_call>nope</tool_call>\n',
     ParsedOutput('\n<tool_call>nope</tool_call>\n')),
]


@pytest.mark.parametrize(("text", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.parametrize("name", ["hermes", "qwen"])
def test_parse(name: str, text: str, want: ParsedOutput) -> None:
    assert make_tool_parser(name).parse(text) == want


def test_stream_events_for_text_and_call() -> None:
    s = make_tool_parser("hermes").stream()
    assert s.feed("Let me <tool") == [ContentDelta("Let me ")]  # the marker's start is held
    assert s.feed('_call>{"name": "f", ') == []
    assert s.feed('"arguments": {"a": "b"}}\n</tool_') == []
    assert s.feed("call>\n") == [CallStart(0, "f"), ArgsDelta(0, '{"a":"b"}'), CallEnd(0)]
    assert s.feed('<tool_call>{"a"') == []
    assert s.feed(' 1}</tool_call> ok') == [ContentDelta('\n<tool_call>{"a" 1}</tool_call>'),
                                           ContentDelta(" ok")]  # not JSON: content
    # Not an object: content as soon as that shows, less what could begin `</tool_call>`.
    assert s.feed("<tool_call>[1</") == [ContentDelta("<tool_call>"), ContentDelta("[1")]
    assert s.feed("tool_call>") == [ContentDelta("</tool_call>")]
    assert s.finish() == []


def test_finish_flushes_an_open_block() -> None:
    s = make_tool_parser("hermes").stream()
    assert s.feed('<tool_call>{"name": "f", "arguments": {"a": "</tool_call>') == []
    assert s.finish() == [ContentDelta('<tool_call>{"name": "f", "arguments": {"a": "</tool_call>')]


@pytest.mark.parametrize(("json_text", "want"), [
    ('{"name": "f", "arguments": {"x": 1}}', ParsedCall("f", '{"x":1}')),
    ('{"name": "", "arguments": {}}', None),
    ('{"name": 3}', None),
    ('{"name": "f", "arguments": "not json"}', None),
    ("[" * 100_000 + "]" * 100_000, None),  # too deep for json: still no exception
])
def test_hermes_call(json_text: str, want: ParsedCall | None) -> None:
    assert hermes_call(json_text) == want
