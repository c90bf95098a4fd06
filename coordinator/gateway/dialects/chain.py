"""`TurnBuilder`: turns assembled message by message, with the tool-call chain checked as it goes.

Every parser feeds its messages (or items) in order; the builder groups them into the model's
turns and raises `ApiError(400)` naming the offending message, in the dialect's own words
(`ChainText`), when a tool result answers no call of the assistant turn just before it, answers
one twice, or when a turn other than tool results follows calls that are not all answered.
Grouping: tool results directly after an assistant turn form one user turn; a user message
directly after such results joins that turn (results first, then text, as Anthropic writes
it); `assistant(merge=True)` extends the open assistant turn (Responses items); system messages
before any turn are the conversation's system prompt, later ones system turns.
"""

from __future__ import annotations

from typing import NamedTuple

from meshd.api_errors import invalid
from meshd.coordinator.gateway.dialects.model import Block, Role, Text, ToolCall, ToolResult, Turn


class ChainText(NamedTuple):
    """The dialect's error texts; `{id}`, `{ids}` and `{param}` are filled in."""

    orphan: str  # a result where the previous turn is no assistant turn with calls
    unexpected: str  # a result whose id is not a call of the previous assistant turn
    missing: str  # calls left unanswered when another kind of message follows
    duplicate: str = "'{param}': the tool call {id} is answered twice."
    duplicate_call: str = "'{param}': the tool call id {id} is used twice in the conversation."


class TurnBuilder:
    """Mutable, single-use; `build()` returns the frozen result. With `open_start` results
    before any assistant turn are accepted unchecked (they answer a stored conversation)."""

    __slots__ = ("_answered", "_blocks", "_calls", "_ids", "_open_start", "_role", "_system",
                 "_text", "_turns")

    def __init__(self, text: ChainText, *, open_start: bool = False) -> None:
        self._text = text
        self._open_start = open_start
        self._system: list[Text] = []
        self._turns: list[Turn] = []
        self._role: Role | None = None
        self._blocks: list[Block] = []
        self._calls: dict[str, None] = {}  # calls of the last assistant turn
        self._answered: set[str] = set()
        self._ids: set[str] = set()

    def system(self, blocks: tuple[Text, ...], param: str) -> None:
        if self._role is None and not self._turns and not self._open_start:
            self._system.extend(blocks)
            return
        self._settle(param)
        self._open("system", blocks)

    def user(self, blocks: tuple[Text, ...], param: str) -> None:
        self._settle(param)
        if self._role == "user" and not any(isinstance(b, Text) for b in self._blocks):
            self._blocks.extend(blocks)  # text after the tool results it follows
        else:
            self._open("user", blocks)

    def assistant(self, blocks: tuple[Block, ...], param: str, *, merge: bool = False) -> None:
        if not (merge and self._role == "assistant"):
            self._settle(param)
            self._open("assistant", ())
            self._calls, self._answered = {}, set()
        for b in blocks:
            if isinstance(b, ToolCall):
                if b.id in self._ids:
                    raise invalid(self._text.duplicate_call.format(param=param, id=b.id), param)
                self._ids.add(b.id)
                self._calls[b.id] = None
        self._blocks.extend(blocks)

    def result(self, r: ToolResult, param: str, id_param: str) -> None:
        """`param` names the message, `id_param` its call-id field."""
        in_results = self._role == "user" and not any(isinstance(b, Text) for b in self._blocks)
        if (self._role == "assistant" or in_results) and self._calls:
            if r.call_id not in self._calls:
                raise invalid(self._text.unexpected.format(param=id_param, id=r.call_id),
                              id_param)
        elif not (self._open_start and (self._role is None or in_results)
                  and not any(t.role == "assistant" for t in self._turns)):
            raise invalid(self._text.orphan.format(param=param, id=r.call_id), param)
        if r.call_id in self._answered:
            raise invalid(self._text.duplicate.format(param=id_param, id=r.call_id), id_param)
        self._answered.add(r.call_id)
        if self._role != "user":
            self._open("user", ())
        self._blocks.append(r)

    def pending(self) -> list[str]:
        """Calls of the last assistant turn not answered yet, in call order."""
        return [c for c in self._calls if c not in self._answered]

    def build(self) -> tuple[tuple[Text, ...], tuple[Turn, ...]]:
        self._close()
        return tuple(self._system), tuple(self._turns)

    def _settle(self, param: str) -> None:
        left = self.pending()
        if left:
            raise invalid(self._text.missing.format(param=param, ids=", ".join(left)), param)
        self._calls = {}

    def _open(self, role: Role, blocks: tuple[Block, ...]) -> None:
        self._close()
        self._role, self._blocks = role, list(blocks)

    def _close(self) -> None:
        if self._role is not None and self._blocks:
            self._turns.append(Turn(self._role, tuple(self._blocks)))
        self._role, self._blocks = None, []
