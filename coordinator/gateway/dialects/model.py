"""The internal message model every chat dialect translates to and from.

A `Conversation` is the system prompt, the turns and the tools. Turns are `user`, `assistant`
and (after the first turn only) `system`; tool results live in user turns, as Anthropic puts
them, so an OpenAI `tool` message is a `ToolResult` block of the user turn that answers the
assistant turn before it. The invariants (`Conversation.check_integrity`), which every parser in
this package establishes and every renderer relies on:

- a user turn holds its `ToolResult` blocks first, then its `Text` blocks;
- a turn holding `ToolResult` blocks directly follows an assistant turn with `ToolCall` blocks
  and answers only those calls (each at most once); an assistant turn's calls are all answered
  by the next turn unless it is the last one (for `Conversation.open_start`, a leading results
  turn answers calls of a conversation stored elsewhere and is checked when the two are joined);
- `ToolCall.id` is unique in the conversation; `ToolCall.arguments` is the JSON text of an
  object; `ToolSpec.parameters` is the JSON text of an object or None; tool names are unique;
- system turns and `Conversation.system` hold only `Text`.

Everything is frozen: a conversation can be shared between threads and stored as it is.
`cache_hint` marks a block the client asked to cache (Anthropic `cache_control`; the meshd
extension `cache_control` on OpenAI parts and items): a prefix-routing hint, never a guarantee.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

Role = Literal["user", "assistant", "system"]
Finish = Literal["stop", "length", "tool_calls", "stop_sequence"]
ChoiceMode = Literal["auto", "none", "required", "tool"]


@dataclass(frozen=True, slots=True)
class Text:
    text: str
    cache_hint: bool = False


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the assistant made. `arguments` is JSON text of an object, kept as the client or
    model wrote it (so a re-rendered prompt keeps its bytes)."""

    id: str
    name: str
    arguments: str
    cache_hint: bool = False


@dataclass(frozen=True, slots=True)
class ToolResult:
    call_id: str
    content: str
    is_error: bool = False
    cache_hint: bool = False


@dataclass(frozen=True, slots=True)
class Reasoning:
    """The model's reasoning. `signature` is the opaque token some providers attach (Anthropic
    `signature`, Responses `encrypted_content`); with `redacted` the block is Anthropic's
    `redacted_thinking`, `text` is empty and `signature` holds its `data`."""

    text: str
    signature: str | None = None
    redacted: bool = False


Block = Text | ToolCall | ToolResult | Reasoning


@dataclass(frozen=True, slots=True)
class Turn:
    role: Role
    blocks: tuple[Block, ...]

    def calls(self) -> tuple[ToolCall, ...]:
        return tuple(b for b in self.blocks if isinstance(b, ToolCall))

    def results(self) -> tuple[ToolResult, ...]:
        return tuple(b for b in self.blocks if isinstance(b, ToolResult))

    def texts(self) -> tuple[Text, ...]:
        return tuple(b for b in self.blocks if isinstance(b, Text))

    def reasoning(self) -> tuple[Reasoning, ...]:
        return tuple(b for b in self.blocks if isinstance(b, Reasoning))


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the model may call. `parameters`: JSON text of its JSON-schema object, or None
    when the dialect allowed leaving it out (OpenAI)."""

    name: str
    description: str | None = None
    parameters: str | None = None
    strict: bool | None = None
    cache_hint: bool = False

    def schema(self) -> dict[str, Any] | None:
        """The parameters schema as a fresh dict (the caller may mutate it)."""
        return None if self.parameters is None else json.loads(self.parameters)


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """`mode` "tool" forces the call of `name`; "required" forces some call (Anthropic "any")."""

    mode: ChoiceMode = "auto"
    name: str | None = None

    def __post_init__(self) -> None:
        if (self.mode == "tool") != (self.name is not None):
            raise ValueError(f"ToolChoice: name is required exactly for mode 'tool' "
                             f"(mode={self.mode!r}, name={self.name!r})")


@dataclass(frozen=True, slots=True)
class Conversation:
    """`tool_choice` None: the client did not say (each dialect's default applies).
    `open_start`: the first turn may answer tool calls of a stored conversation (a Responses
    request with `previous_response_id`)."""

    system: tuple[Text, ...] = ()
    turns: tuple[Turn, ...] = ()
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    open_start: bool = False

    def check_integrity(self) -> None:
        """Raise AssertionError if an invariant of the module docstring does not hold."""
        assert all(isinstance(b, Text) for b in self.system)
        names = [t.name for t in self.tools]
        assert len(set(names)) == len(names), f"duplicate tool names {names}"
        seen: set[str] = set()
        prev: Turn | None = None
        for i, turn in enumerate(self.turns):
            _check_turn(turn, i, self.open_start)
            for c in turn.calls():
                assert c.id not in seen, f"turn {i}: duplicate call id {c.id}"
                assert type(json.loads(c.arguments)) is dict, f"turn {i}: {c.id} arguments"
                seen.add(c.id)
            _check_answers(prev, turn, i, self.open_start and i == 0)
            prev = turn


def _check_turn(turn: Turn, i: int, open_start: bool) -> None:
    assert turn.blocks, f"turn {i} is empty"
    if turn.role == "system":
        assert all(isinstance(b, Text) for b in turn.blocks), f"turn {i}: system holds non-text"
        assert i > 0 or open_start, "a leading system turn belongs in Conversation.system"
    elif turn.role == "user":
        kinds = [isinstance(b, ToolResult) for b in turn.blocks]
        assert all(isinstance(b, Text | ToolResult) for b in turn.blocks), f"turn {i}"
        assert kinds == sorted(kinds, reverse=True), f"turn {i}: text before tool results"
    else:
        assert not turn.results(), f"turn {i}: tool results in an assistant turn"


def _check_answers(prev: Turn | None, turn: Turn, i: int, open_start: bool) -> None:
    answered = [r.call_id for r in turn.results()]
    assert len(set(answered)) == len(answered), f"turn {i}: a call answered twice"
    if answered and not open_start:
        assert prev is not None and prev.role == "assistant", f"turn {i}: results follow no call"
        assert set(answered) <= {c.id for c in prev.calls()}, f"turn {i}: unknown call ids"
    if prev is not None and prev.calls():
        assert set(answered) == {c.id for c in prev.calls()}, f"turn {i}: calls unanswered"


def cache_hint_prefix(conv: Conversation) -> int:
    """How many leading units carry the client's cache hint: units are counted in prompt order
    (tools, then system blocks, then every turn's blocks) up to and including the last one with
    `cache_hint`; 0 when none has it. Anthropic caches the whole prefix up to a marked block."""
    n = last = 0
    for tool in conv.tools:
        n += 1
        last = n if tool.cache_hint else last
    for text in conv.system:
        n += 1
        last = n if text.cache_hint else last
    for turn in conv.turns:
        for b in turn.blocks:
            n += 1
            last = n if getattr(b, "cache_hint", False) else last
    return last


def truncated(conv: Conversation, units: int) -> Conversation:
    """`conv` with only its first `units` units (counted as `cache_hint_prefix` counts them):
    the prefix a cache hint marks, for rendering."""
    tools = conv.tools[:units]
    left = max(0, units - len(conv.tools))
    system = conv.system[:left]
    left = max(0, left - len(conv.system))
    turns: list[Turn] = []
    for turn in conv.turns:
        if left <= 0:
            break
        turns.append(turn if len(turn.blocks) <= left else Turn(turn.role, turn.blocks[:left]))
        left -= len(turn.blocks)
    return Conversation(system, tuple(turns), tools, conv.tool_choice,
                        conv.parallel_tool_calls, conv.open_start)


def cache_hint_count(conv: Conversation) -> int:
    """How many tools and blocks carry `cache_hint` (Anthropic allows at most 4)."""
    return (sum(t.cache_hint for t in conv.tools) + sum(t.cache_hint for t in conv.system)
            + sum(getattr(b, "cache_hint", False) for turn in conv.turns for b in turn.blocks))


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one completion. `prompt_tokens` includes `cached_tokens` (OpenAI's
    convention; Anthropic's `input_tokens` is `prompt_tokens - cached_tokens`)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Completion:
    """What the model produced for one choice. Each call's `arguments` must be JSON text of an
    object (the worker's tool parser guarantees it; renderers raise ValueError otherwise).
    `stop_sequence` is the matched stop string, set exactly when `finish` is "stop_sequence"."""

    text: str = ""
    reasoning: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    finish: Finish = "stop"
    stop_sequence: str | None = None

    def __post_init__(self) -> None:
        if (self.finish == "stop_sequence") != (self.stop_sequence is not None):
            raise ValueError("Completion: stop_sequence is set exactly when finish is "
                             f"'stop_sequence' (finish={self.finish!r})")


def completion_turn(c: Completion) -> Turn:
    """The assistant turn a completion adds to the conversation (reasoning, text, calls)."""
    blocks: list[Block] = []
    if c.reasoning:
        blocks.append(Reasoning(c.reasoning))
    if c.text or not (blocks or c.tool_calls):
        blocks.append(Text(c.text))
    blocks.extend(c.tool_calls)
    return Turn("assistant", tuple(blocks))


def arguments_object(call: ToolCall) -> dict[str, Any]:
    """`call.arguments` parsed; ValueError if it is not the JSON text of an object."""
    try:
        obj = json.loads(call.arguments)
    except ValueError:
        obj = None
    if type(obj) is not dict:
        raise ValueError(f"tool call {call.id}: arguments are not a JSON object: "
                         f"{call.arguments[:80]!r}")
    return obj
