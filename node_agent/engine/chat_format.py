"""Chat prompts: meshd's built-in chat format and a model's own jinja template.

Messages follow the Hugging Face convention: `role`, `content` (a string, None, or a list of
`{"type": "text", "text": ...}` parts), assistant `tool_calls` (`[{"id", "type": "function",
"function": {"name", "arguments"}}]`, arguments a dict or its JSON text), tool results
`{"role": "tool", "tool_call_id", "content"}`, `reasoning_content`. `tools` is the OpenAI
function tool list, handed to the model's template as transformers does. Tokenizers
(tokenizer.py) encode what these render.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

Message = Mapping[str, Any]
ToolSpecs = Sequence[Mapping[str, Any]]


def _plain(value: Any) -> Any:
    """A deep copy of mappings and lists as dicts and lists (tuples stay tuples)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    return value


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _template_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Messages as the template sees them: plain copies; reasoning under `reasoning_content`
    and `thinking` too (what transformers does); tool call arguments given as JSON text turned
    into the dict templates expect (what vLLM does)."""
    out = []
    for m in messages:
        msg = _plain(m)
        reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        for call in msg.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments", ""), str):
                with contextlib.suppress(ValueError):  # not JSON: left as the text it is
                    fn["arguments"] = json.loads(fn.get("arguments") or "{}")
        out.append(msg)
    return out


def _content_text(m: Message) -> str:
    content = m.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, Mapping) for p in content):
        return "".join(p["text"] for p in content if isinstance(p.get("text"), str))
    raise ValueError("messages: content must be a string or a list of text parts")


_TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
               "You are provided with function signatures within <tools></tools> XML tags:\n"
               "<tools>")
_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name "
               "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
               '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _json(value: object, what: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: not JSON: {e}") from None


def _assistant_text(m: Mapping[str, Any]) -> str:
    text = _content_text(m)
    parts = [text] if text else []
    for call in m.get("tool_calls") or ():
        fn = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise ValueError("messages: each tool call needs a function name")
        body = {"name": fn["name"], "arguments": fn.get("arguments", {})}
        parts.append(f"<tool_call>\n{_json(body, 'messages')}\n</tool_call>")
    return "\n".join(parts)


def chat_text(messages: Sequence[Message], add_generation_prompt: bool,
              tools: ToolSpecs | None = None) -> str:
    """meshd's built-in chat format: `<|role|>content<|end|>` per message, then `<|assistant|>`.
    With tools, the Hermes conventions: the tools as JSON lines in `<tools></tools>` in the
    system turn (the first message's, or one of its own), assistant calls as
    `<tool_call>{json}</tool_call>` lines after the content, tool results as
    `<|tool|><tool_response>...</tool_response>` turns (`<|tool|>` is plain text, not a
    special token, so the vocabulary stays as it was). Reasoning in the history is dropped."""
    parts = []
    msgs = _template_messages(messages)
    if tools:
        section = _TOOLS_HEAD + "".join("\n" + _json(t, "tools") for t in tools) + _TOOLS_TAIL
        if msgs and msgs[0].get("role") == "system":
            section = f"{_content_text(msgs[0])}\n\n{section}"
            msgs = msgs[1:]
        parts.append(f"<|system|>{section}<|end|>")
    for m in msgs:
        role = m.get("role", "")
        if role == "tool":
            parts.append(f"<|tool|><tool_response>\n{_content_text(m)}\n</tool_response><|end|>")
        elif role == "assistant":
            parts.append(f"<|assistant|>{_assistant_text(m)}<|end|>")
        elif role in ("system", "user"):
            parts.append(f"<|{role}|>{_content_text(m)}<|end|>")
        else:
            raise ValueError(f"messages: unknown role {role!r} (system, user, assistant, tool)")
    if add_generation_prompt:
        parts.append("<|assistant|>")
    return "".join(parts)


def _tojson(value: object, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' `tojson` filter: plain `json.dumps` (jinja's own escapes HTML characters
    and sorts keys), non-ASCII kept, its options exposed."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A model's jinja chat template, rendered the way transformers does (sandboxed, trim and
    lstrip blocks, `loopcontrols`, `raise_exception`, `tojson`, `strftime_now`, the special
    tokens, `tools` and `documents` as variables), so the gateway's chat prompts are the ones
    vLLM builds from the same `tokenizer_config.json`."""

    def __init__(self, source: str, special: Mapping[str, str]) -> None:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = _strftime_now
        env.filters["tojson"] = _tojson
        self.source = source
        self._template = env.from_string(source)
        self._special = dict(special)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool, *,
               tools: ToolSpecs | None = None) -> str:
        """The prompt text; ValueError if the template raises or cannot render the input."""
        import jinja2

        try:
            return str(self._template.render(
                messages=_template_messages(messages),
                tools=None if tools is None else _plain(list(tools)), documents=None,
                add_generation_prompt=add_generation_prompt, **self._special))
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            raise ValueError(f"chat template: {e}") from None
