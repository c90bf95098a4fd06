"""The internal model out to the Responses API: response objects, stream events, input items.

`response_from_completion` is the `Response` object; `ResponseStream` the event sequence of a
streamed one, each event `(name, data)` with `data["type"] == name` and a `sequence_number`
from 0: `response.created`, `response.in_progress`, then per output item
`response.output_item.added` ... `response.output_item.done` (a message's
`content_part.added`, `output_text.delta`s, `output_text.done`, `content_part.done`; a
function call's `function_call_arguments.delta`s and `.done`), and `response.completed` (or
`response.incomplete` after `length`: `incomplete_details.reason` "max_output_tokens", the last
item "incomplete"). Reasoning is raw chain of thought, so it is a reasoning item with
`reasoning_text` content (streamed as `response.reasoning_text.delta`, as vLLM does) and an
empty `summary`. Item ids derive from the response id (`msg_<rest>_<index>` for `resp_<rest>`),
so the stream's and the final object's ids agree. `input_items_from_conversation` writes a
conversation as a request body that `parse_responses_request` reads back.
"""

from __future__ import annotations

from typing import Any

from meshd.coordinator.gateway.dialects.model import (
    Completion,
    Conversation,
    Finish,
    Reasoning,
    Text,
    ToolCall,
    ToolChoice,
    ToolSpec,
    Turn,
    Usage,
)
from meshd.coordinator.gateway.dialects.responses import ResponsesRequest

Event = tuple[str, dict[str, Any]]
_EPHEMERAL = {"type": "ephemeral"}
_PREFIX = {"reasoning": "rs", "message": "msg", "function_call": "fc"}


def response_tool(spec: ToolSpec) -> dict[str, Any]:
    return {"type": "function", "name": spec.name, "description": spec.description,
            "parameters": spec.schema(), "strict": spec.strict}


def _choice(tc: ToolChoice | None) -> str | dict[str, Any]:
    if tc is None:
        return "auto"
    return {"type": "function", "name": tc.name} if tc.mode == "tool" else tc.mode


def response_usage(u: Usage) -> dict[str, Any]:
    return {"input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": u.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def response_object(req: ResponsesRequest, *, id: str, model: str, created_at: float,
                    status: str, output: list[dict[str, Any]],
                    usage: Usage | None) -> dict[str, Any]:
    """The `Response` with the request's settings echoed."""
    conv = req.conversation
    return {
        "id": id, "object": "response", "created_at": created_at, "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "model": model, "output": output, "parallel_tool_calls": conv.parallel_tool_calls,
        "previous_response_id": req.previous_response_id, "store": req.store,
        "temperature": req.temperature, "top_p": req.top_p,
        "text": {"format": req.response_format or {"type": "text"}},
        "tool_choice": _choice(conv.tool_choice),
        "tools": [response_tool(t) for t in conv.tools], "metadata": req.metadata or {},
        "user": req.user, "usage": None if usage is None else response_usage(usage)}


def _item_id(prefix: str, response_id: str, index: int) -> str:
    return f"{prefix}_{response_id.removeprefix('resp_')}_{index}"


def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": status}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _call_item(item_id: str, call: ToolCall, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call.id, "name": call.name,
            "arguments": call.arguments, "status": status}


def response_from_completion(c: Completion, req: ResponsesRequest, *, id: str, model: str,
                             created_at: float, usage: Usage) -> dict[str, Any]:
    """The non-streaming response: a reasoning item, a message item (when there is text, or
    nothing else), then one function_call item per call."""
    output: list[dict[str, Any]] = []
    if c.reasoning:
        output.append(_reasoning_item(_item_id("rs", id, len(output)), c.reasoning, "completed"))
    if c.text or not (output or c.tool_calls):
        output.append(_message_item(_item_id("msg", id, len(output)), c.text, "completed"))
    for call in c.tool_calls:
        output.append(_call_item(_item_id("fc", id, len(output)), call, "completed"))
    status = "incomplete" if c.finish == "length" else "completed"
    output[-1]["status"] = status
    return response_object(req, id=id, model=model, created_at=created_at, status=status,
                           output=output, usage=usage)


class ResponseStream:
    """One streamed response. `start` first, then any of `reasoning` / `text` /
    `tool_call_start` + `tool_args`, then `finish`. An item closes when an item of another
    kind (or another call) starts, or at `finish`. Not thread-safe."""

    __slots__ = ("_buf", "_call", "_created", "_id", "_items", "_kind", "_model", "_req",
                 "_seq")

    def __init__(self, req: ResponsesRequest, *, id: str, model: str,
                 created_at: float) -> None:
        self._req, self._id, self._model, self._created = req, id, model, created_at
        self._seq = 0
        self._items: list[dict[str, Any]] = []
        self._kind: str | None = None  # the open item's type
        self._buf: list[str] = []
        self._call: ToolCall | None = None

    def start(self) -> list[Event]:
        return [self._ev("response.created", response=self._response("in_progress", None)),
                self._ev("response.in_progress", response=self._response("in_progress", None))]

    def reasoning(self, delta: str) -> list[Event]:
        return self._delta("reasoning", "response.reasoning_text.delta", delta)

    def text(self, delta: str) -> list[Event]:
        return self._delta("message", "response.output_text.delta", delta)

    def tool_call_start(self, call_id: str, name: str) -> list[Event]:
        events = self._close("completed")
        self._kind, self._buf = "function_call", []
        self._call = ToolCall(call_id, name, "")
        item = _call_item(self._open_id("fc"), self._call, "in_progress")
        events.append(self._ev("response.output_item.added", output_index=len(self._items),
                               item=item))
        return events

    def tool_args(self, delta: str) -> list[Event]:
        if self._kind != "function_call":
            raise ValueError("ResponseStream.tool_args without an open tool call")
        return self._delta("function_call", "response.function_call_arguments.delta", delta)

    def finish(self, finish: Finish, usage: Usage) -> list[Event]:
        status = "incomplete" if finish == "length" else "completed"
        empty = self._kind is None and not self._items
        events = self._open("message") if empty else []  # an empty message, as non-streaming
        events.extend(self._close(status))
        name = "response.incomplete" if status == "incomplete" else "response.completed"
        events.append(self._ev(name, response=self._response(status, usage)))
        return events

    def _response(self, status: str, usage: Usage | None) -> dict[str, Any]:
        return response_object(self._req, id=self._id, model=self._model,
                               created_at=self._created, status=status,
                               output=list(self._items), usage=usage)

    def _ev(self, name: str, **fields: Any) -> Event:
        data = {"type": name, "sequence_number": self._seq, **fields}
        self._seq += 1
        return (name, data)

    def _open_id(self, prefix: str) -> str:
        return _item_id(prefix, self._id, len(self._items))

    def _part(self, text: str) -> dict[str, Any]:
        if self._kind == "reasoning":
            return {"type": "reasoning_text", "text": text}
        return {"type": "output_text", "text": text, "annotations": []}

    def _open(self, kind: str) -> list[Event]:
        events = self._close("completed")
        self._kind, self._buf = kind, []
        index = len(self._items)
        if kind == "reasoning":
            item: dict[str, Any] = {**_reasoning_item(self._open_id("rs"), "", "in_progress"),
                                    "content": []}
        else:
            item = {**_message_item(self._open_id("msg"), "", "in_progress"), "content": []}
        events.append(self._ev("response.output_item.added", output_index=index, item=item))
        events.append(self._ev("response.content_part.added", item_id=item["id"],
                               output_index=index, content_index=0, part=self._part("")))
        return events

    def _delta(self, kind: str, name: str, delta: str) -> list[Event]:
        if not delta:
            return []
        events = [] if self._kind == kind else self._open(kind)
        self._buf.append(delta)
        where = {"item_id": self._open_id(_PREFIX[kind]), "output_index": len(self._items)}
        if kind == "function_call":
            events.append(self._ev(name, **where, delta=delta))
        else:
            extra: dict[str, Any] = {"logprobs": []} if kind == "message" else {}
            events.append(self._ev(name, **where, content_index=0, delta=delta, **extra))
        return events

    def _close(self, status: str) -> list[Event]:
        kind, text, index = self._kind, "".join(self._buf), len(self._items)
        if kind is None:
            return []
        events: list[Event] = []
        if kind == "function_call":
            assert self._call is not None
            call = ToolCall(self._call.id, self._call.name, text)
            item = _call_item(self._open_id(_PREFIX[kind]), call, status)
            events.append(self._ev("response.function_call_arguments.done",
                                   item_id=item["id"], output_index=index, arguments=text))
        else:
            make = _reasoning_item if kind == "reasoning" else _message_item
            item = make(self._open_id(_PREFIX[kind]), text, status)
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            if kind == "reasoning":
                events.append(self._ev("response.reasoning_text.done", **where, text=text))
            else:
                events.append(self._ev("response.output_text.done", **where, text=text,
                                       logprobs=[]))
            events.append(self._ev("response.content_part.done", **where,
                                   part=self._part(text)))
        events.append(self._ev("response.output_item.done", output_index=index, item=item))
        self._items.append(item)
        self._kind, self._buf, self._call = None, [], None
        return events


def _parts(texts: tuple[Text, ...], kind: str) -> list[dict[str, Any]]:
    out = []
    for t in texts:
        part: dict[str, Any] = {"type": kind, "text": t.text}
        if kind == "output_text":
            part["annotations"] = []
        if t.cache_hint:
            part["cache_control"] = dict(_EPHEMERAL)
        out.append(part)
    return out


def _assistant_items(turn: Turn, t: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    run: list[Text] = []  # consecutive texts: one message item, named after the first
    for k, b in enumerate((*turn.blocks, None)):
        if isinstance(b, Text):
            run.append(b)
            continue
        if run:
            items.append({**_message_item(f"msg_{t}_{k - len(run)}", "", "completed"),
                          "content": _parts(tuple(run), "output_text")})
            run = []
        if isinstance(b, Reasoning) and (b.text or b.signature is not None):
            item = _reasoning_item(f"rs_{t}_{k}", b.text, "completed")
            if not b.text:
                item["content"] = []
            if b.signature is not None:
                item["encrypted_content"] = b.signature
            items.append(item)
        elif isinstance(b, ToolCall):
            item = _call_item(f"fc_{t}_{k}", b, "completed")
            if b.cache_hint:
                item["cache_control"] = dict(_EPHEMERAL)
            items.append(item)
    return items


def responses_body_from_conversation(conv: Conversation) -> dict[str, Any]:
    """`input` (the system prompt as a leading system message), `tools`, `tool_choice` and
    `parallel_tool_calls` of a Responses body for `conv`; the caller adds `model` and any
    `instructions`. `parse_responses_request` reads it back to `conv`."""
    items: list[dict[str, Any]] = []
    if conv.system:
        items.append({"type": "message", "role": "system",
                      "content": _parts(conv.system, "input_text")})
    for t, turn in enumerate(conv.turns):
        if turn.role == "assistant":
            items.extend(_assistant_items(turn, t))
            continue
        for r in turn.results():
            out: dict[str, Any] = {"type": "function_call_output", "call_id": r.call_id,
                                   "output": r.content}
            if r.is_error:
                out["is_error"] = True
            if r.cache_hint:
                out["cache_control"] = dict(_EPHEMERAL)
            items.append(out)
        if turn.texts():
            items.append({"type": "message", "role": turn.role,
                          "content": _parts(turn.texts(), "input_text")})
    body: dict[str, Any] = {"input": items}
    if conv.tools:
        body["tools"] = [{**response_tool(s), **({"cache_control": dict(_EPHEMERAL)}
                                                 if s.cache_hint else {})} for s in conv.tools]
    if conv.tool_choice is not None:
        body["tool_choice"] = _choice(conv.tool_choice)
    if not conv.parallel_tool_calls:
        body["parallel_tool_calls"] = False
    return body
