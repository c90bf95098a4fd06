"""Anthropic Messages and OpenAI Responses bodies as the mesh path's `ChatRequest`.

`dialects/` validates each body into its own request type with the conversation in the internal
model; here it becomes a `ChatRequest` carrying that conversation (the prompt is rendered from
it), the dialect's sampling fields mapped onto the mesh path's, and the dialect request itself
(kept on the `ApiRequest` for the response's shape). One choice each: neither API has `n`.
"""

from __future__ import annotations

from typing import Any

from meshd.coordinator.gateway.config import Limits
from meshd.coordinator.gateway.dialects.anthropic import MessagesRequest, parse_messages_request
from meshd.coordinator.gateway.dialects.model import (
    Conversation,
    Reasoning,
    Text,
    ToolCall,
    ToolResult,
)
from meshd.coordinator.gateway.dialects.responses import (
    ResponsesRequest,
    parse_responses_request,
)
from meshd.coordinator.gateway.http.openai_api import ChatMessage, ChatRequest, Sampling

_NO_EXTRA: dict[str, Any] = {}


def flat_messages(conv: Conversation) -> tuple[ChatMessage, ...]:
    """The conversation's text as plain chat messages (what reads a chat request's messages:
    the loop breaker's and records' views; the prompt itself is rendered from the
    conversation)."""
    out = [ChatMessage("system", t.text) for t in conv.system if t.text]
    for turn in conv.turns:
        parts = []
        for b in turn.blocks:
            if isinstance(b, (Text, Reasoning)):
                parts.append(b.text)
            elif isinstance(b, ToolResult):
                parts.append(b.content)
            elif isinstance(b, ToolCall):
                parts.append(b.arguments)
        text = "\n".join(p for p in parts if p)
        if text:
            out.append(ChatMessage(turn.role, text))
    return tuple(out)


def parse_messages(obj: object, lim: Limits) -> tuple[ChatRequest, MessagesRequest]:
    m = parse_messages_request(obj, lim)
    s = m.sampling
    extra = {"top_k": s.top_k} if s.top_k is not None else _NO_EXTRA
    body = ChatRequest(
        model=m.model, messages=flat_messages(m.conversation), stream=m.stream,
        include_usage=False,
        sampling=Sampling(1, s.stop_sequences, None, s.temperature, s.top_p, s.max_tokens),
        logprobs=False, top_logprobs=None, user=m.user, tools=None, tool_choice=None,
        response_format=None, extra=extra, conversation=m.conversation, prefill=m.prefill)
    return body, m


def parse_responses(obj: object, lim: Limits) -> tuple[ChatRequest, ResponsesRequest]:
    r = parse_responses_request(obj, lim)
    body = ChatRequest(
        model=r.model, messages=flat_messages(r.conversation), stream=r.stream,
        include_usage=False,
        sampling=Sampling(1, (), None, r.temperature, r.top_p, r.max_output_tokens),
        logprobs=False, top_logprobs=None, user=r.user, tools=None, tool_choice=None,
        response_format=chat_format(r.response_format), extra=_NO_EXTRA,
        conversation=r.conversation)
    return body, r


def chat_format(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    """A Responses `text.format` in chat's (and vLLM's) `response_format` shape: json_schema's
    name, schema, strict and description move under `json_schema`."""
    if fmt is None or fmt.get("type") != "json_schema":
        return fmt
    inner = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
    return {"type": "json_schema", "json_schema": inner}
