"""Parsers by name, as vLLM's `--tool-call-parser` / `--reasoning-parser` name them.

Unknown names raise `ValueError` listing the valid ones; parser modules are imported on first
use.
"""

from __future__ import annotations

from meshd.coordinator.gateway.tools.events import ReasoningParser, ToolParser
from meshd.scheduler.policy import Registry

TOOL_PARSERS: Registry[ToolParser] = Registry("tool parser")
REASONING_PARSERS: Registry[ReasoningParser] = Registry("reasoning parser")

_M = "meshd.coordinator.gateway.tools."
for _name, _target in {"hermes": "hermes:HermesParser", "qwen": "hermes:HermesParser",
                       "llama3_json": "llama:Llama3JsonParser",
                       "none": "plain:PlainParser"}.items():
    TOOL_PARSERS.register(_name, _M + _target)
for _name, _target in {"qwen3": "reasoning:qwen3_reasoning",
                       "deepseek_r1": "reasoning:deepseek_r1_reasoning",
                       "none": "plain:PlainParser"}.items():
    REASONING_PARSERS.register(_name, _M + _target)


def make_tool_parser(name: str) -> ToolParser:
    """"hermes" (alias "qwen"), "llama3_json" or "none"."""
    return TOOL_PARSERS.create(name)


def make_reasoning_parser(name: str) -> ReasoningParser:
    """"qwen3", "deepseek_r1" or "none"."""
    return REASONING_PARSERS.create(name)


def make_output_parser(tools: str = "none", reasoning: str = "none") -> ToolParser:
    """The tool parser `tools`, behind the reasoning parser `reasoning` unless that is "none"."""
    from meshd.coordinator.gateway.tools.plain import OutputParser

    tool_parser = make_tool_parser(tools)
    if reasoning == "none":
        return tool_parser
    return OutputParser(make_reasoning_parser(reasoning), tool_parser)
