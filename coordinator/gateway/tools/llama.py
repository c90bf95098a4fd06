"""Llama 3.x JSON tool calls: the whole output is `{"name": ..., "parameters": {...}}`.

Optionally after `<|python_tag|>` (when decoding keeps special tokens), possibly several
objects separated by `;`; `"arguments"` is accepted for `"parameters"` (exactly one of them,
an object). All or nothing, as vLLM's `llama3_json`: if any part is not a call, or anything
but whitespace and `;` surrounds the objects, the whole output is content, exactly as
generated.

Streaming: an output that does not start (after whitespace) with `{` or `<|python_tag|>` is
content and streams as it arrives; one that does is held until `finish`, which emits its calls
or, failing that, all of it as one content delta.
"""

from __future__ import annotations

from meshd.coordinator.gateway.tools.events import (
    JSON_DECODER,
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

PYTHON_TAG = "<|python_tag|>"

_HEAD, _TEXT, _JSON = range(3)


def _skip_space(text: str, pos: int) -> int:
    n = len(text)
    while pos < n and text[pos].isspace():
        pos += 1
    return pos


def _llama_call(obj: object) -> ParsedCall | None:
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    given = [obj[k] for k in ("parameters", "arguments") if k in obj]
    if not isinstance(name, str) or not name or len(given) != 1:
        return None
    args = given[0]
    if isinstance(args, str):
        try:
            args = load_json(args)
        except ValueError:
            return None
    return ParsedCall(name, compact_json(args)) if isinstance(args, dict) else None


def llama_calls(text: str) -> list[ParsedCall] | None:
    """The calls `text` consists of, or None if it is not only calls."""
    s = text.lstrip()
    s = s.removeprefix(PYTHON_TAG)
    calls: list[ParsedCall] = []
    pos = _skip_space(s, 0)
    while True:
        try:
            obj, pos = JSON_DECODER.raw_decode(s, pos)
        except (ValueError, RecursionError):
            return None
        call = _llama_call(obj)
        if call is None:
            return None
        calls.append(call)
        pos = _skip_space(s, pos)
        if pos < len(s) and s[pos] == ";":
            pos = _skip_space(s, pos + 1)
        elif pos < len(s):
            return None
        if pos == len(s):
            return calls


class Llama3JsonParser:
    """`ToolParser` for Llama 3.x JSON calls (registry name "llama3_json")."""

    def parse(self, text: str) -> ParsedOutput:
        return parse_all(self.stream(), text)

    def stream(self) -> OutputStream:
        return Llama3JsonStream()


class Llama3JsonStream:
    __slots__ = ("_parts", "_state")

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._state = _HEAD

    def feed(self, delta: str) -> list[StreamEvent]:
        if self._state == _TEXT:
            return [ContentDelta(delta)] if delta else []
        self._parts.append(delta)
        if self._state == _JSON:
            return []
        head = "".join(self._parts)
        s = head.lstrip()
        if s.startswith(("{", PYTHON_TAG)):
            self._state = _JSON
            return []
        if PYTHON_TAG.startswith(s):  # undecided: only whitespace, or part of the tag
            return []
        self._state, self._parts = _TEXT, []
        return [ContentDelta(head)]

    def finish(self) -> list[StreamEvent]:
        text = "".join(self._parts)
        self._parts = []
        calls = llama_calls(text) if self._state == _JSON else None
        if calls is None:
            return [ContentDelta(text)] if text else []
        return [e for i, c in enumerate(calls) for e in call_events(i, c)]
