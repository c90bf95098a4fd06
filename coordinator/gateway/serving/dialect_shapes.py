"""Response shapes for the structured dialects: Anthropic Messages, OpenAI Responses, and OpenAI
chat whose output is parsed (tool calls, reasoning).

The mesh path runs a request's choices the same way whatever its dialect; what differs is how
the generated text reaches the client. A `DialectShape` feeds each choice's text through the
model's output parser (`tools/`: `<tool_call>` blocks, Llama 3 JSON calls, `<think>`
reasoning), gives every call an id, and writes the dialect's events (`dialects/`) as SSE bytes
(`event: NAME` lines where the dialect names its events), or the whole body at the end. It is
used instead of `shapes.Shaper` only when there is something to parse or a dialect to speak:
plain chat without tools keeps the plain path.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import Any, Protocol

import orjson

from meshd.coordinator.gateway.dialects.anthropic_out import (
    MessageStream,
    message_from_completion,
)
from meshd.coordinator.gateway.dialects.model import Completion, Finish, ToolCall, Usage
from meshd.coordinator.gateway.dialects.openai_chat import (
    chat_finish_reason,
    chat_message_from_completion,
)
from meshd.coordinator.gateway.dialects.responses import ResponsesRequest
from meshd.coordinator.gateway.dialects.responses_out import (
    ResponseStream,
    response_from_completion,
)
from meshd.coordinator.gateway.serving.shapes import ChoiceOutput, Delta
from meshd.coordinator.gateway.tools import (
    ArgsDelta,
    CallStart,
    ContentDelta,
    OutputStream,
    ReasoningDelta,
    StreamEvent,
    ToolParser,
)

Event = tuple[str, dict[str, Any]]


def sse(name: str | None, data: dict[str, Any]) -> bytes:
    """One SSE event: `event: NAME` (when named) and its JSON data."""
    body = orjson.dumps(data)
    return b"event: %b\ndata: %b\n\n" % (name.encode(), body) if name else (
        b"data: " + body + b"\n\n")


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def finish_of(out: ChoiceOutput, calls: bool) -> tuple[Finish, str | None]:
    """The internal finish of a choice: its tool calls, else the worker's reason (a matched
    stop string: stop_sequence)."""
    if calls:
        return "tool_calls", None
    if out.finish_reason == "length":
        return "length", None
    if isinstance(out.stop_reason, str) and out.stop_reason:
        return "stop_sequence", out.stop_reason
    return "stop", None


def usage_of(usage: dict[str, Any]) -> Usage:
    """The mesh path's OpenAI usage dict as the internal `Usage`."""
    details = usage.get("prompt_tokens_details") or {}
    return Usage(int(usage["prompt_tokens"]), int(usage["completion_tokens"]),
                 int(details.get("cached_tokens") or 0))


class EventStream(Protocol):
    """What Anthropic's `MessageStream` and the Responses `ResponseStream` both take."""

    def text(self, delta: str) -> list[Event]: ...

    def reasoning(self, delta: str) -> list[Event]: ...

    def tool_call_start(self, id: str, name: str) -> list[Event]: ...

    def tool_args(self, delta: str) -> list[Event]: ...


def dialect_events(stream: EventStream, p: ChoiceParse, events: list[StreamEvent]
                   ) -> list[Event]:
    """A choice's parsed events as the dialect stream's events (call ids: `p`'s)."""
    out: list[Event] = []
    for e in events:
        if isinstance(e, ContentDelta):
            out += stream.text(e.text)
        elif isinstance(e, ReasoningDelta):
            out += stream.reasoning(e.text)
        elif isinstance(e, CallStart):
            out += stream.tool_call_start(p.ids[e.index], e.name)
        elif isinstance(e, ArgsDelta):
            out += stream.tool_args(e.text)
    return out


class ChoiceParse:
    """One choice's text through the output parser, streamed; call ids assigned here."""

    __slots__ = ("call_prefix", "calls", "content", "ids", "reasoning", "stream")

    def __init__(self, parser: ToolParser, call_prefix: str) -> None:
        self.stream: OutputStream = parser.stream()
        self.call_prefix = call_prefix
        self.ids: list[str] = []
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[list[str]] = []  # per call: name, then argument pieces

    def feed(self, text: str) -> list[StreamEvent]:
        return self._keep(self.stream.feed(text)) if text else []

    def finish(self) -> list[StreamEvent]:
        return self._keep(self.stream.finish())

    def _keep(self, events: list[StreamEvent]) -> list[StreamEvent]:
        for e in events:
            if isinstance(e, ContentDelta):
                self.content.append(e.text)
            elif isinstance(e, ReasoningDelta):
                self.reasoning.append(e.text)
            elif isinstance(e, CallStart):
                self.ids.append(new_id(self.call_prefix))
                self.calls.append([e.name])
            elif isinstance(e, ArgsDelta):
                self.calls[e.index].append(e.text)
        return events

    def completion(self, out: ChoiceOutput) -> Completion:
        """What the choice produced (call `finish` first)."""
        calls = tuple(ToolCall(i, c[0], "".join(c[1:]) or "{}")
                      for i, c in zip(self.ids, self.calls, strict=True))
        finish, stop = finish_of(out, bool(calls))
        return Completion("".join(self.content),
                          "".join(self.reasoning) if self.reasoning else None, calls,
                          finish, stop)


class DialectShape:
    """The shape of one request's response in a structured dialect. `head` goes out when the
    stream starts, `events` per worker delta of choice `index`, `tail` after every choice
    ended; `body` is the whole non-streamed response. `done`: end with `data: [DONE]`."""

    done = False
    call_prefix = "call_"

    def __init__(self, parser: ToolParser, model: str, n: int = 1) -> None:
        self.model = model
        self.created = int(time.time())
        self.parses = [ChoiceParse(parser, self.call_prefix) for _ in range(n)]
        self.id = ""

    def completions(self, outputs: Sequence[ChoiceOutput]) -> list[Completion]:
        """Every choice's completion from its whole text (a response not streamed)."""
        for p, o in zip(self.parses, outputs, strict=True):
            p.feed("".join(o.text))
            p.finish()
        return [p.completion(o) for p, o in zip(self.parses, outputs, strict=True)]

    def head(self, prompt_tokens: int) -> list[bytes]:
        return []

    def events(self, index: int, d: Delta) -> list[bytes]:
        raise NotImplementedError

    def tail(self, outputs: Sequence[ChoiceOutput], usage: dict[str, Any],
             meshd: dict[str, Any] | None) -> list[bytes]:
        raise NotImplementedError

    def body(self, outputs: Sequence[ChoiceOutput], usage: dict[str, Any],
             meshd: dict[str, Any] | None = None) -> bytes:
        raise NotImplementedError


class MessagesShape(DialectShape):
    """Anthropic Messages (one choice)."""

    call_prefix = "toolu_"

    def __init__(self, parser: ToolParser, model: str, request_id: str) -> None:
        super().__init__(parser, model)
        self.id = "msg_" + request_id
        self.stream = MessageStream()

    def head(self, prompt_tokens: int) -> list[bytes]:
        events = self.stream.start(self.id, self.model, Usage(prompt_tokens, 0))
        return [sse(n, d) for n, d in (*events, *self.stream.ping())]

    def events(self, index: int, d: Delta) -> list[bytes]:
        return [sse(n, data) for n, data in dialect_events(
            self.stream, self.parses[0], self.parses[0].feed(d.text))]

    def tail(self, outputs: Sequence[ChoiceOutput], usage: dict[str, Any],
             meshd: dict[str, Any] | None) -> list[bytes]:
        p, s = self.parses[0], self.stream
        out = dialect_events(s, p, p.finish())
        c = p.completion(outputs[0])
        u = usage_of(usage)
        end = s.finish(c.finish, c.stop_sequence, u.completion_tokens)
        for name, data in end:  # the final usage, cache reads included, as Anthropic sends
            if name == "message_delta":
                data["usage"] = {"input_tokens": u.prompt_tokens - u.cached_tokens,
                                 "cache_read_input_tokens": u.cached_tokens,
                                 "cache_creation_input_tokens": 0,
                                 "output_tokens": u.completion_tokens}
                if meshd is not None:
                    data["meshd"] = meshd
        return [sse(n, data) for n, data in (*out, *end)]

    def body(self, outputs: Sequence[ChoiceOutput], usage: dict[str, Any],
             meshd: dict[str, Any] | None = None) -> bytes:
        c = self.completions(outputs)[0]
        msg = message_from_completion(c, id=self.id, model=self.model, usage=usage_of(usage))
        if meshd is not None:
            msg["meshd"] = meshd
        return orjson.dumps(msg)


class ResponsesShape(DialectShape):
    """OpenAI Responses (one choice)."""

    def __init__(self, parser: ToolParser, model: str, request_id: str,
                 req: ResponsesRequest) -> None:
        super().__init__(parser, model)
        self.id = "resp_" + request_id
        self.req = req
        self.stream = ResponseStream(req, id=self.id, model=model, created_at=self.created)
        self.completion: Completion | None = None  # set at the end (the store keeps it)
        self.final: dict[str, Any] | None = None  # the Response object, as the client got it

    def head(self, prompt_tokens: int) -> list[bytes]:
        return [sse(n, d) for n, d in self.stream.start()]

    def events(self, index: int, d: Delta) -> list[bytes]:
        return [sse(n, data) for n, data in dialect_events(self.stream, self.parses[0],
                                                                 self.parses[0].feed(d.text))]

    def tail(self, outputs: Sequence[ChoiceOutput], usage: dict[str, Any],
             meshd: dict[str, Any] | None) -> list[bytes]:
        out = dialect_events(self.stream, self.parses[0], self.parses[0].finish())
        c = self.completion = self.parses[0].completion(outputs[0])
        end = self.stream.finish(c.finish, usage_of(usage))
        if meshd is not None and end:
            end[-1][1]["response"]["meshd"] = meshd
        if end:
            self.final = end[-1][1]["response"]
        return [sse(n, data) for n, data in (*out, *end)]

    def body(self, outputs: Sequence[ChoiceOutput], usage: dict[str, Any],
             meshd: dict[str, Any] | None = None) -> bytes:
        c = self.completion = self.completions(outputs)[0]
        obj = response_from_completion(c, self.req, id=self.id, model=self.model,
                                       created_at=self.created, usage=usage_of(usage))
        if meshd is not None:
            obj["meshd"] = meshd
        self.final = obj
        return orjson.dumps(obj)


class ChatToolsShape(DialectShape):
    """OpenAI chat completions whose output is parsed: `tool_calls` (streamed as
    `delta.tool_calls`), `reasoning_content`; finish_reason `tool_calls` when it called."""

    done = True

    def __init__(self, parser: ToolParser, model: str, request_id: str, n: int,
                 include_usage: bool) -> None:
        super().__init__(parser, model, n)
        self.id = "chatcmpl-" + request_id
        self.include_usage = include_usage
        self._role_sent: set[int] = set()

    def _chunk(self, index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse(None, {"id": self.id, "object": "chat.completion.chunk",
                          "created": self.created, "model": self.model,
                          "choices": [{"index": index, "delta": delta, "logprobs": None,
                                       "finish_reason": finish}]})

    def _deltas(self, index: int, events: list[StreamEvent]) -> list[bytes]:
        p = self.parses[index]
        out = []
        for e in events:
            delta: dict[str, Any]
            if isinstance(e, ContentDelta):
                delta = {"content": e.text}
            elif isinstance(e, ReasoningDelta):
                delta = {"reasoning_content": e.text}
            elif isinstance(e, CallStart):
                delta = {"tool_calls": [{"index": e.index, "id": p.ids[e.index],
                                         "type": "function",
                                         "function": {"name": e.name, "arguments": ""}}]}
            elif isinstance(e, ArgsDelta):
                delta = {"tool_calls": [{"index": e.index,
                                         "function": {"arguments": e.text}}]}
            else:
                continue
            if index not in self._role_sent:
                self._role_sent.add(index)
                delta = {"role": "assistant", **delta}
            out.append(self._chunk(index, delta))
        return out

    def events(self, index: int, d: Delta) -> list[bytes]:
        return self._deltas(index, self.parses[index].feed(d.text))

    def tail(self, outputs: Sequence[ChoiceOutput], usage: dict[str, Any],
             meshd: dict[str, Any] | None) -> list[bytes]:
        out: list[bytes] = []
        for i, (p, o) in enumerate(zip(self.parses, outputs, strict=True)):
            out += self._deltas(i, p.finish())
            finish = chat_finish_reason(p.completion(o))
            if o.finish_reason == "low_confidence":
                finish = o.finish_reason
            out.append(self._chunk(i, {} if i in self._role_sent else {"role": "assistant"},
                                   finish))
        if self.include_usage:
            out.append(sse(None, {"id": self.id, "object": "chat.completion.chunk",
                                  "created": self.created, "model": self.model,
                                  "choices": [], "usage": usage}))
        if meshd is not None:
            out.append(sse(None, {"id": self.id, "object": "chat.completion.chunk",
                                  "created": self.created, "model": self.model,
                                  "choices": [], "meshd": meshd}))
        return out

    def body(self, outputs: Sequence[ChoiceOutput], usage: dict[str, Any],
             meshd: dict[str, Any] | None = None) -> bytes:
        choices = []
        for i, (c, o) in enumerate(zip(self.completions(outputs), outputs, strict=True)):
            finish = ("low_confidence" if o.finish_reason == "low_confidence"
                      else chat_finish_reason(c))
            choices.append({"index": i, "message": chat_message_from_completion(c),
                            "logprobs": None, "finish_reason": finish})
        out: dict[str, Any] = {"id": self.id, "object": "chat.completion",
                               "created": self.created, "model": self.model,
                               "choices": choices, "usage": usage}
        if meshd is not None:
            out["meshd"] = meshd
        return orjson.dumps(out)
