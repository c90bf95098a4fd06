"""Which output parser reads a model's generated text (tool calls, reasoning), per model.

`[gateway] tool_parsers` and `reasoning_parsers` name them per model, as vLLM's
`--tool-call-parser` / `--reasoning-parser` do ("hermes", "llama3_json", ...; "qwen3",
"deepseek_r1"). A model without a configured tool parser gets the one its chat template
writes: a template that renders `<tool_call>` is Hermes/Qwen's format, one with
`<|python_tag|>` Llama 3's JSON, the built-in template (no tokenizer files) Hermes; any other
template has none, and its tool calls stay text. Tool calls are parsed only when the request
offers tools (and its tool choice is not "none").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from meshd.coordinator.gateway.tools import ToolParser, make_output_parser
from meshd.node_agent.engine.tokenizer import Tokenizer


def template_tool_format(tok: Tokenizer) -> str:
    """The tool-call format the model's chat template writes ("none" if unknown)."""
    template = getattr(tok, "chat_template", None)
    if template is None:
        return "hermes"  # meshd's built-in template writes Hermes calls
    source = getattr(template, "source", "")
    if "<tool_call>" in source:
        return "hermes"
    if "<|python_tag|>" in source or "ipython" in source:
        return "llama3_json"
    return "none"


class OutputParsers:
    """Parsers per model; `for_request` is None when there is nothing to parse."""

    def __init__(self, tool_parsers: Mapping[str, str], reasoning_parsers: Mapping[str, str],
                 tokenizer: Callable[[str], Tokenizer]) -> None:
        self.tool_parsers = dict(tool_parsers)
        self.reasoning_parsers = dict(reasoning_parsers)
        self._tokenizer = tokenizer
        self._made: dict[tuple[str, str], ToolParser] = {}

    def names(self, model: str, tools: bool) -> tuple[str, str]:
        """(tool parser, reasoning parser) for `model`; the tool parser is "none" when the
        request offers no tools."""
        tool = "none"
        if tools:
            tool = self.tool_parsers.get(model) or template_tool_format(self._tokenizer(model))
        return tool, self.reasoning_parsers.get(model, "none")

    def for_request(self, model: str, tools: bool) -> ToolParser | None:
        tool, reasoning = self.names(model, tools)
        if tool == "none" and reasoning == "none":
            return None
        key = (tool, reasoning)
        parser = self._made.get(key)
        if parser is None:
            parser = self._made[key] = make_output_parser(tool, reasoning)
        return parser

    def plain(self) -> ToolParser:
        return make_output_parser("none", "none")
