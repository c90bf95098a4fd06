"""An enforced tool choice: the JSON schema a worker samples under, and the calls read back."""

from __future__ import annotations

import json

import pytest

from meshd.coordinator.gateway.dialects.model import ToolChoice, ToolSpec
from meshd.coordinator.gateway.tools import ParsedCall, ParsedOutput, collect
from meshd.coordinator.gateway.tools.forced import ForcedParser, forced_format

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = ToolSpec("get_weather", "The weather.", json.dumps(CITY))
TIME = ToolSpec("get_time")  # no parameters schema (OpenAI allows leaving it out)


def test_a_named_tool_samples_its_arguments() -> None:
    fmt, name = forced_format((WEATHER, TIME), ToolChoice("tool", "get_weather")) or ({}, "")
    assert name == "get_weather"
    assert fmt == {"type": "json_schema", "json_schema": {"name": "get_weather", "schema": CITY}}
    fmt, name = forced_format((WEATHER, TIME), ToolChoice("tool", "get_time")) or ({}, "")
    assert fmt["json_schema"]["schema"] == {"type": "object"}


@pytest.mark.parametrize("parallel", [True, False])
def test_required_samples_an_array_of_calls(parallel: bool) -> None:
    fmt, name = forced_format((WEATHER, TIME), ToolChoice("required"), parallel) or ({}, "")
    assert name is None
    schema = fmt["json_schema"]["schema"]
    assert schema["type"] == "array" and schema["minItems"] == 1
    assert ("maxItems" in schema) is (not parallel)
    names = [c["properties"]["name"]["enum"] for c in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]
    one, _ = forced_format((WEATHER,), ToolChoice("required")) or ({}, "")
    assert one["json_schema"]["schema"]["items"]["properties"]["arguments"] == CITY


@pytest.mark.parametrize("choice", [None, ToolChoice("auto"), ToolChoice("none"),
                                    ToolChoice("tool", "nope")])
def test_nothing_forced(choice: ToolChoice | None) -> None:
    assert forced_format((WEATHER,), choice) is None
    assert forced_format((), ToolChoice("required")) is None


@pytest.mark.parametrize(("name", "text", "want"), [
    ("get_weather", '{"city": "Paris"}',
     ParsedOutput("", (ParsedCall("get_weather", '{"city":"Paris"}'),))),
    (None, '[{"name": "get_weather", "arguments": {"city": "Rome"}}, '
           '{"name": "get_time", "arguments": {}}]',
     ParsedOutput("", (ParsedCall("get_weather", '{"city":"Rome"}'),
                       ParsedCall("get_time", "{}")))),
    # cut short by max_tokens (or not what the format allows): text, never dropped
    ("get_weather", '{"city": "Par', ParsedOutput('{"city": "Par')),
    (None, "[]", ParsedOutput("[]")),
    (None, '[{"name": "x"}]', ParsedOutput('[{"name": "x"}]')),
    ("get_weather", "[1]", ParsedOutput("[1]")),
    ("get_weather", "", ParsedOutput("")),
])
def test_the_calls_read_back_streamed_or_not(name: str | None, text: str,
                                             want: ParsedOutput) -> None:
    parser = ForcedParser(name)
    assert parser.parse(text) == want
    for cut in range(len(text) + 1):  # every split point: the same result
        s = parser.stream()
        events = s.feed(text[:cut]) + s.feed(text[cut:]) + s.finish()
        assert collect(events) == want
