"""`<think>`…`</think>` reasoning, in the two styles of vLLM's reasoning parsers.

- "qwen3" (Qwen3 up to 2504, whose chat template leaves `<think>` to the model): reasoning only
  if the output starts, after whitespace, with `<think>`; it runs to `</think>`, or to the end
  of the output if that never comes (a truncated generation). Any other output is all content,
  which covers `enable_thinking=False` (the template put an empty think block in the prompt).
- "deepseek_r1" (DeepSeek-R1, QwQ, Qwen3 thinking-2507: the template opens `<think>` in the
  prompt): the output is reasoning from its start to `</think>` (a leading `<think>` the model
  repeats is dropped), all reasoning if `</think>` never comes.

Text is kept exactly (no stripping around the markers), except the whitespace before a
leading `<think>`. Streaming holds back only what could still be a marker.
"""

from __future__ import annotations

from meshd.coordinator.gateway.tools.events import (
    ContentDelta,
    OutputStream,
    ParsedOutput,
    ReasoningDelta,
    StreamEvent,
    held_suffix,
    parse_all,
)

THINK_START = "<think>"
THINK_END = "</think>"

_HEAD, _REASONING, _CONTENT = range(3)


class ThinkReasoningParser:
    """`ReasoningParser`; `starts_in_reasoning`: True for the deepseek_r1 style."""

    __slots__ = ("starts_in_reasoning",)

    def __init__(self, starts_in_reasoning: bool = False) -> None:
        self.starts_in_reasoning = starts_in_reasoning

    def parse(self, text: str) -> ParsedOutput:
        return parse_all(self.stream(), text)

    def stream(self) -> OutputStream:
        return ThinkStream(self.starts_in_reasoning)


def qwen3_reasoning() -> ThinkReasoningParser:
    return ThinkReasoningParser(starts_in_reasoning=False)


def deepseek_r1_reasoning() -> ThinkReasoningParser:
    return ThinkReasoningParser(starts_in_reasoning=True)


class ThinkStream:
    __slots__ = ("_buf", "_implicit", "_state")

    def __init__(self, starts_in_reasoning: bool) -> None:
        self._buf = ""
        self._implicit = starts_in_reasoning
        self._state = _HEAD

    def feed(self, delta: str) -> list[StreamEvent]:
        if self._state == _CONTENT:
            return [ContentDelta(delta)] if delta else []
        out: list[StreamEvent] = []
        self._buf += delta
        if self._state == _HEAD and not self._decide_head():
            return out
        if self._state == _REASONING:
            buf = self._buf
            i = buf.find(THINK_END)
            if i < 0:
                cut = held_suffix(buf, THINK_END)
                if cut:
                    out.append(ReasoningDelta(buf[:cut]))
                self._buf = buf[cut:]
                return out
            if i:
                out.append(ReasoningDelta(buf[:i]))
            self._buf, self._state = buf[i + len(THINK_END):], _CONTENT
        if self._buf:
            out.append(ContentDelta(self._buf))
        self._buf = ""
        return out

    def finish(self) -> list[StreamEvent]:
        buf, self._buf = self._buf, ""
        if not buf:
            return []
        in_reasoning = self._state == _REASONING or (self._state == _HEAD and self._implicit)
        return [ReasoningDelta(buf) if in_reasoning else ContentDelta(buf)]

    def _decide_head(self) -> bool:
        """Leave `_HEAD` once the start shows whether a `<think>` opens the output."""
        s = self._buf.lstrip()
        if s.startswith(THINK_START):
            self._buf, self._state = s[len(THINK_START):], _REASONING
        elif THINK_START.startswith(s):
            return False
        else:
            self._state = _REASONING if self._implicit else _CONTENT
        return True
