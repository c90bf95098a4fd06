"""An enforced tool choice: the format a worker samples under, and the parser of what it wrote.

A request whose tool choice is a named tool (OpenAI `{"type": "function", ...}`, Anthropic
`{"type": "tool"}`, Responses `{"type": "function"}`) or `required` (Anthropic `any`) must
come back as tool calls. Where the model's workers enforce a `response_format` (vLLM's
structured outputs), the gateway does what vLLM's own chat endpoint does for these choices:
the worker samples under a JSON schema instead of the model's own call markup —

    named     the tool's parameters schema: the output is that call's arguments
    required  an array of {"name": one of the tools, "arguments": its parameters}, at least
              one (exactly one when parallel tool calls are off)

— and `ForcedParser` turns the JSON it wrote into the calls. The prompt is the same (the
template still renders the tools). Output the schema did not let finish (cut by `max_tokens`)
does not parse, and is returned as text, never dropped. Pure.
"""

from __future__ import annotations

from typing import Any

from meshd.coordinator.gateway.dialects.model import ToolChoice, ToolSpec
from meshd.coordinator.gateway.tools.events import (
    ContentDelta,
    OutputStream,
    ParsedCall,
    ParsedOutput,
    StreamEvent,
    call_events,
    compact_json,
    load_json,
    parse_all,
)

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def forced_format(tools: tuple[ToolSpec, ...], choice: ToolChoice | None,
                  parallel: bool = True) -> tuple[dict[str, Any], str | None] | None:
    """The `response_format` that enforces `choice` over `tools`, and the forced tool's name
    (None for `required`); None when the choice forces nothing (auto, none, no tools)."""
    if choice is None or not tools or choice.mode not in ("tool", "required"):
        return None
    if choice.mode == "tool":
        spec = next((t for t in tools if t.name == choice.name), None)
        if spec is None:  # the dialects refuse a choice naming no tool; be safe
            return None
        return _json_schema(spec.name, spec.schema() or _ANY_OBJECT), spec.name
    calls = [{"type": "object", "properties": {"name": {"enum": [t.name]},
                                               "arguments": t.schema() or _ANY_OBJECT},
              "required": ["name", "arguments"], "additionalProperties": False}
             for t in tools]
    array: dict[str, Any] = {"type": "array", "minItems": 1,
                             "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if not parallel:
        array["maxItems"] = 1
    return _json_schema("tool_calls", array), None


def _json_schema(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


class ForcedParser:
    """The calls in the JSON a worker wrote under `forced_format` (`name`: the named tool's;
    None: an array of calls). Calls come whole at the end, as every parser here streams them."""

    __slots__ = ("name",)

    def __init__(self, name: str | None) -> None:
        self.name = name

    def parse(self, text: str) -> ParsedOutput:
        return parse_all(self.stream(), text)

    def stream(self) -> OutputStream:
        return ForcedStream(self.name)

    def calls(self, text: str) -> tuple[ParsedCall, ...] | None:
        """The calls `text` spells, or None when it is not what the format allows."""
        try:
            value = load_json(text)
        except ValueError:
            return None
        if self.name is not None:
            return (ParsedCall(self.name, compact_json(value)),) if isinstance(value, dict) \
                else None
        if not isinstance(value, list) or not value:
            return None
        out = []
        for item in value:
            if not (isinstance(item, dict) and isinstance(item.get("name"), str)
                    and isinstance(item.get("arguments"), dict)):
                return None
            out.append(ParsedCall(item["name"], compact_json(item["arguments"])))
        return tuple(out)


class ForcedStream:
    __slots__ = ("_parser", "_text")

    def __init__(self, name: str | None) -> None:
        self._parser = ForcedParser(name)
        self._text: list[str] = []

    def feed(self, delta: str) -> list[StreamEvent]:
        self._text.append(delta)  # held whole: it is calls, or (cut short) text, at the end
        return []

    def finish(self) -> list[StreamEvent]:
        text = "".join(self._text)
        calls = self._parser.calls(text)
        if calls is None:
            return [ContentDelta(text)] if text else []
        return [e for i, c in enumerate(calls) for e in call_events(i, c)]
