"""Hermes-format tool calls (Hermes 2 Pro, Qwen2.5, Qwen3): `<tool_call>{json}</tool_call>`.

Each block holds `{"name": ..., "arguments": {...}}` (whitespace around the object allowed;
`arguments` may be absent, meaning `{}`, or a string holding a JSON object). Content is the
text outside the blocks, exactly, except whitespace-only text directly before a call at the
start of the output, between calls, or after the last call, which is dropped. A block that is
not a valid call (malformed JSON, no name, anything but whitespace between the object and
`</tool_call>`) is content, markers and all; so is a block still open when the output ends.

Streaming: content is emitted as it arrives except a suffix that could begin `<tool_call>`;
a call is emitted whole (`CallStart`, one `ArgsDelta`, `CallEnd`) at its `</tool_call>`, since
until then the block may still turn out to be content.
"""

from __future__ import annotations

from meshd.coordinator.gateway.tools.events import (
    ContentDelta,
    OutputStream,
    ParsedCall,
    ParsedOutput,
    StreamEvent,
    call_events,
    compact_json,
    held_suffix,
    load_json,
    parse_all,
)
from meshd.coordinator.gateway.tools.json_scan import MALFORMED, NEED_MORE, ObjectScanner

START = "<tool_call>"
END = "</tool_call>"

_TEXT, _OBJECT, _TRAIL, _BAD = range(4)  # outside a block; in its JSON; after it; not a call


def hermes_call(json_text: str) -> ParsedCall | None:
    """The call a block's JSON object describes, or None if it is not one."""
    try:
        obj = load_json(json_text)
        if not isinstance(obj, dict):
            return None
        name, args = obj.get("name"), obj.get("arguments", {})
        if isinstance(args, str):
            args = load_json(args)
    except ValueError:
        return None
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    return ParsedCall(name, compact_json(args))


class HermesParser:
    """`ToolParser` for the Hermes `<tool_call>` format (registry names "hermes", "qwen")."""

    def parse(self, text: str) -> ParsedOutput:
        return parse_all(self.stream(), text)

    def stream(self) -> OutputStream:
        return HermesStream()


class HermesStream:
    """`_buf`: text not yet emitted — a held suffix outside blocks, else the open block's text
    after `<tool_call>`. `_pending`: whitespace held while `_hold_ws` (at the start, after a
    call), dropped if a call follows or the output ends after a call."""

    __slots__ = ("_buf", "_calls", "_hold_ws", "_obj_end", "_pending", "_scanner", "_state")

    def __init__(self) -> None:
        self._buf = ""
        self._state = _TEXT
        self._scanner = ObjectScanner()
        self._obj_end = 0
        self._pending = ""
        self._hold_ws = True
        self._calls = 0

    def feed(self, delta: str) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        self._buf += delta
        while self._step(out):
            pass
        return out

    def finish(self) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        self._content(self._buf if self._state in (_TEXT, _BAD) else START + self._buf, out)
        self._buf = ""
        if self._pending and not self._calls:
            out.append(ContentDelta(self._pending))
        self._pending = ""
        return out

    def _step(self, out: list[StreamEvent]) -> bool:
        """Advance through `_buf` as far as it decides; False when it needs more text."""
        buf = self._buf
        if self._state == _TEXT:
            return self._through(START, _OBJECT, out)
        if self._state == _BAD:
            return self._through(END, _TEXT, out)
        if self._state == _OBJECT:
            end = self._scanner.scan(buf)
            if end == NEED_MORE:
                return False
            if end == MALFORMED:
                return self._malformed(out)
            self._obj_end, self._state = end, _TRAIL
            return True
        rest = buf[self._obj_end:].lstrip()
        if rest.startswith(END):
            stop = len(buf) - len(rest) + len(END)
            self._close(buf[:self._obj_end], buf[:stop], out)
            self._buf, self._state = buf[stop:], _TEXT
            return True
        return self._malformed(out) if not END.startswith(rest) else False

    def _through(self, marker: str, then: int, out: list[StreamEvent]) -> bool:
        """Emit content up to `marker` (through it if it ends a bad block) and switch to
        `then`; without the marker, emit all but a suffix that could begin it."""
        buf = self._buf
        i = buf.find(marker)
        if i < 0:
            cut = held_suffix(buf, marker)
            self._content(buf[:cut], out)
            self._buf = buf[cut:]
            return False
        keep = i + len(marker) if marker == END else i
        self._content(buf[:keep], out)
        self._buf, self._state = buf[i + len(marker):], then
        if then == _OBJECT:
            self._scanner = ObjectScanner()
        return True

    def _malformed(self, out: list[StreamEvent]) -> bool:
        self._content(START, out)
        self._state = _BAD  # the block's text is content through its `</tool_call>`
        return True

    def _close(self, json_text: str, block: str, out: list[StreamEvent]) -> None:
        call = hermes_call(json_text)
        if call is None:
            self._content(START + block, out)
            return
        out.extend(call_events(self._calls, call))
        self._calls += 1
        self._pending, self._hold_ws = "", True

    def _content(self, text: str, out: list[StreamEvent]) -> None:
        if not text:
            return
        if self._hold_ws:
            if text.isspace():
                self._pending += text
                return
            text, self._pending, self._hold_ws = self._pending + text, "", False
        out.append(ContentDelta(text))
