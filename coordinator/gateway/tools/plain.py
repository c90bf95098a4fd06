"""The "none" parsers, and `OutputParser`: a reasoning parser, then a tool parser on its content.
"""

from __future__ import annotations

from meshd.coordinator.gateway.tools.events import (
    ContentDelta,
    OutputStream,
    ParsedOutput,
    ReasoningParser,
    StreamEvent,
    ToolParser,
    parse_all,
)


class PlainParser:
    """No tool calls and no reasoning: the output is all content ("none" in both registries)."""

    def parse(self, text: str) -> ParsedOutput:
        return ParsedOutput(text)

    def stream(self) -> OutputStream:
        return PlainStream()


class PlainStream:
    __slots__ = ()

    def feed(self, delta: str) -> list[StreamEvent]:
        return [ContentDelta(delta)] if delta else []

    def finish(self) -> list[StreamEvent]:
        return []


class OutputParser:
    """`ToolParser` for models that reason first: the reasoning parser splits the output, and
    its content (only) goes through the tool parser. A `<tool_call>` inside the reasoning is
    reasoning."""

    __slots__ = ("reasoning", "tools")

    def __init__(self, reasoning: ReasoningParser, tools: ToolParser) -> None:
        self.reasoning = reasoning
        self.tools = tools

    def parse(self, text: str) -> ParsedOutput:
        return parse_all(self.stream(), text)

    def stream(self) -> OutputStream:
        return ChainedStream(self.reasoning.stream(), self.tools.stream())


class ChainedStream:
    __slots__ = ("_reasoning", "_tools")

    def __init__(self, reasoning: OutputStream, tools: OutputStream) -> None:
        self._reasoning = reasoning
        self._tools = tools

    def feed(self, delta: str) -> list[StreamEvent]:
        return self._route(self._reasoning.feed(delta))

    def finish(self) -> list[StreamEvent]:
        out = self._route(self._reasoning.finish())
        out.extend(self._tools.finish())
        return out

    def _route(self, events: list[StreamEvent]) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        for e in events:
            if isinstance(e, ContentDelta):
                out.extend(self._tools.feed(e.text))
            else:
                out.append(e)
        return out
