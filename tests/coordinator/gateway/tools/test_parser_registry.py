"""Parser names: the valid ones, aliases, and the error for an unknown one."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from meshd.coordinator.gateway.tools.hermes import HermesParser
from meshd.coordinator.gateway.tools.llama import Llama3JsonParser
from meshd.coordinator.gateway.tools.plain import OutputParser, PlainParser
from meshd.coordinator.gateway.tools.reasoning import ThinkReasoningParser
from meshd.coordinator.gateway.tools.registry import (
    REASONING_PARSERS,
    TOOL_PARSERS,
    make_output_parser,
    make_reasoning_parser,
    make_tool_parser,
)


@pytest.mark.parametrize(("name", "kind"), [
    ("hermes", HermesParser), ("qwen", HermesParser), ("llama3_json", Llama3JsonParser),
    ("none", PlainParser)])
def test_tool_parsers(name: str, kind: type) -> None:
    assert type(make_tool_parser(name)) is kind


@pytest.mark.parametrize(("name", "starts_in_reasoning"), [("qwen3", False),
                                                           ("deepseek_r1", True)])
def test_reasoning_parsers(name: str, starts_in_reasoning: bool) -> None:
    parser = make_reasoning_parser(name)
    assert isinstance(parser, ThinkReasoningParser)
    assert parser.starts_in_reasoning is starts_in_reasoning
    assert type(make_reasoning_parser("none")) is PlainParser


def test_names() -> None:
    assert TOOL_PARSERS.names() == ["hermes", "llama3_json", "none", "qwen"]
    assert REASONING_PARSERS.names() == ["deepseek_r1", "none", "qwen3"]


@pytest.mark.parametrize(("make", "message"), [
    (make_tool_parser, "unknown tool parser 'mistral'; valid: hermes, llama3_json, none, qwen"),
    (make_reasoning_parser, "unknown reasoning parser 'mistral'; valid: deepseek_r1, none, qwen3"),
])
def test_unknown_name_lists_the_valid(make: Callable[[str], object], message: str) -> None:
    with pytest.raises(ValueError) as e:
        make("mistral")
    assert str(e.value) == message


def test_output_parser() -> None:
    assert type(make_output_parser("hermes")) is HermesParser  # no reasoning: the tool parser
    chained = make_output_parser("llama3_json", "qwen3")
    assert isinstance(chained, OutputParser)
    assert type(chained.tools) is Llama3JsonParser
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        make_output_parser("hermes", "nope")
