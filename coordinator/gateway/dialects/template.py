"""A conversation as the messages and tools a Hugging Face chat template renders.

The convention vLLM and transformers feed `apply_chat_template`: every message has a string
`content` (text blocks joined with "\\n", as vLLM joins text parts); an assistant's calls are
`tool_calls` with `function.arguments` parsed into a dict; its reasoning is
`reasoning_content`; each tool result is its own `{"role": "tool", "tool_call_id", "content"}`
message, in order, where the user turn was, and the turn's text follows as one user message.

Lost on purpose, because no template convention carries them: cache hints, `is_error` (the
result's content is passed as it is), reasoning signatures and redacted reasoning (which has
no text). A conversation ending with an assistant turn (an Anthropic prefill) is rendered with
that message last: the caller renders it with `continue_final_message=True` and no generation
prompt. The tools are returned whatever `tool_choice` says; the caller decides.
"""

from __future__ import annotations

from typing import Any

from meshd.coordinator.gateway.dialects.model import (
    Conversation,
    Text,
    ToolSpec,
    Turn,
    arguments_object,
)


def _joined(texts: tuple[Text, ...]) -> str:
    return "\n".join(t.text for t in texts)


def _assistant(turn: Turn) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": _joined(turn.texts())}
    calls = turn.calls()
    if calls:
        msg["tool_calls"] = [
            {"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": arguments_object(c)}}
            for c in calls]
    reasoning = [r.text for r in turn.reasoning() if r.text]
    if reasoning:
        msg["reasoning_content"] = "\n".join(reasoning)
    return msg


def template_tool(spec: ToolSpec) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": spec.name}
    if spec.description is not None:
        fn["description"] = spec.description
    if spec.parameters is not None:
        fn["parameters"] = spec.schema()
    return {"type": "function", "function": fn}


def to_template_messages(
        conv: Conversation) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools or None when there are none); fresh objects the caller may mutate.
    Raises ValueError if a call's arguments are not a JSON object (never after parsing)."""
    messages: list[dict[str, Any]] = []
    if conv.system:
        messages.append({"role": "system", "content": _joined(conv.system)})
    for turn in conv.turns:
        if turn.role == "assistant":
            messages.append(_assistant(turn))
            continue
        for r in turn.results():
            messages.append({"role": "tool", "tool_call_id": r.call_id, "content": r.content})
        texts = turn.texts()
        if texts:
            messages.append({"role": turn.role, "content": _joined(texts)})
    tools = [template_tool(t) for t in conv.tools] or None
    return messages, tools
