"""The contracts of output parsing: results, stream events, the parser protocols.

A parser turns a model's generated text into content, tool calls and reasoning, either all at
once (`parse`) or delta by delta (`stream()`, then `feed` each delta and `finish` at the end).
Every parser here is one state machine: `parse(text)` is `collect` of the events of a fresh
stream fed the whole text, so streaming and non-streaming results agree by construction, for
any split of the text into deltas (the tests check every split point).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias


@dataclass(frozen=True, slots=True)
class ParsedCall:
    """One tool call: the function's name and its arguments as compact JSON object text."""

    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ParsedOutput:
    """`content`: the text outside tool calls and reasoning; `reasoning`: None where the output
    had no reasoning text."""

    content: str
    calls: tuple[ParsedCall, ...] = ()
    reasoning: str | None = None


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True, slots=True)
class CallStart:
    """Call `index` (0, 1, ... in output order) begins; its name is exact and whole."""

    index: int
    name: str


@dataclass(frozen=True, slots=True)
class ArgsDelta:
    """More of call `index`'s arguments text; the call's deltas concatenated are its exact
    arguments."""

    index: int
    text: str


@dataclass(frozen=True, slots=True)
class CallEnd:
    index: int


StreamEvent: TypeAlias = ContentDelta | ReasoningDelta | CallStart | ArgsDelta | CallEnd


class OutputStream(Protocol):
    """One generation's incremental parse. `feed` takes the next delta of text and returns the
    events it completes (text that may still turn out to be a marker is held back); `finish`
    flushes what is held. Neither raises on any text; call `finish` once, then stop."""

    def feed(self, delta: str) -> list[StreamEvent]: ...

    def finish(self) -> list[StreamEvent]: ...


class ToolParser(Protocol):
    """Tool calls out of generated text. Stateless: each `stream()` is independent."""

    def parse(self, text: str) -> ParsedOutput: ...

    def stream(self) -> OutputStream: ...


class ReasoningParser(Protocol):
    """Reasoning out of generated text: its streams emit only `ReasoningDelta` and
    `ContentDelta`; `parse` returns no calls."""

    def parse(self, text: str) -> ParsedOutput: ...

    def stream(self) -> OutputStream: ...


def collect(events: Iterable[StreamEvent]) -> ParsedOutput:
    """Fold a stream's events into the `ParsedOutput` they describe."""
    content: list[str] = []
    reasoning: list[str] = []
    names: list[str] = []
    args: list[list[str]] = []
    for e in events:
        if isinstance(e, ContentDelta):
            content.append(e.text)
        elif isinstance(e, ReasoningDelta):
            reasoning.append(e.text)
        elif isinstance(e, CallStart):
            assert e.index == len(names), "calls start in index order"
            names.append(e.name)
            args.append([])
        elif isinstance(e, ArgsDelta):
            args[e.index].append(e.text)
    calls = tuple(ParsedCall(n, "".join(a)) for n, a in zip(names, args, strict=True))
    return ParsedOutput("".join(content), calls, "".join(reasoning) or None)


def parse_all(stream: OutputStream, text: str) -> ParsedOutput:
    """`text` through a fresh `stream`, folded: what every parser's `parse` is."""
    return collect([*stream.feed(text), *stream.finish()])


def held_suffix(text: str, marker: str) -> int:
    """Where the suffix of `text` that could be the start of `marker` begins (`len(text)` if
    none): the part a stream holds back. `marker` starts with its only '<'."""
    start = text.rfind("<", max(0, len(text) - len(marker) + 1))
    return start if start >= 0 and marker.startswith(text[start:]) else len(text)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"not JSON: {name}")


JSON_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # strict: no NaN, Infinity


def load_json(text: str) -> Any:
    """Strict JSON (no NaN/Infinity); ValueError on anything else, never another error."""
    try:
        return JSON_DECODER.decode(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def compact_json(value: object) -> str:
    """The arguments text every parser emits: compact separators, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def call_events(index: int, call: ParsedCall) -> list[StreamEvent]:
    """A whole call as events: arguments are streamed in one delta (see the package doc)."""
    return [CallStart(index, call.name), ArgsDelta(index, call.arguments), CallEnd(index)]
