"""Chat prompts with tools: meshd's built-in format (Hermes conventions) and a model's own jinja
template (a compact Qwen2.5-style one), rendered as transformers renders it."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from meshd.node_agent.engine.tokenizer import ByteTokenizer, ChatTemplate, HFTokenizer, _chat_text

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in <city>",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
TOOLS_JSON = ('{"type": "function", "function": {"name": "get_weather", "description": '
              '"Current weather in <city>", "parameters": {"type": "object", "properties": '
              '{"city": {"type": "string"}}, "required": ["city"]}}}')
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
]

TOOLS_SECTION = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + TOOLS_JSON + "\n</tools>\n\nFor each function call, return a json object with function "
    "name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')

BUILTIN = [
    ("plain messages, as before",
     [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi!"}], None,
     "<|system|>be brief<|end|><|user|>hi!<|end|><|assistant|>"),
    ("tools join the system turn", CONVERSATION, TOOLS,
     "<|system|>You are terse.\n\n" + TOOLS_SECTION + "<|end|><|user|>Weather in Zürich?<|end|>"
     '<|assistant|><tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n'
     '</tool_call><|end|><|tool|><tool_response>\n{"temp": 21}\n</tool_response><|end|>'
     "<|assistant|>"),
    ("tools without a system message", [{"role": "user", "content": "hi"}], TOOLS,
     "<|system|>" + TOOLS_SECTION + "<|end|><|user|>hi<|end|><|assistant|>"),
    ("empty tools are no tools", [{"role": "user", "content": "hi"}], [],
     "<|user|>hi<|end|><|assistant|>"),
    ("content, two calls, string arguments, reasoning dropped",
     [{"role": "assistant", "content": "Checking.", "reasoning_content": "hmm",
       "tool_calls": [CALL, {"type": "function", "function": {
           "name": "now", "arguments": '{"tz": "UTC"}'}}]}], None,
     '<|assistant|>Checking.\n<tool_call>\n{"name": "get_weather", "arguments": '
     '{"city": "Zürich"}}\n</tool_call>\n<tool_call>\n{"name": "now", "arguments": '
     '{"tz": "UTC"}}\n</tool_call><|end|><|assistant|>'),
    ("text parts and None content",
     [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
      {"role": "assistant", "content": None}], None,
     "<|user|>ab<|end|><|assistant|><|end|><|assistant|>"),
]


@pytest.mark.parametrize(("messages", "tools", "want"), [c[1:] for c in BUILTIN],
                         ids=[c[0] for c in BUILTIN])
def test_builtin_format(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                        want: str) -> None:
    assert _chat_text(messages, True, tools) == want
    tok = ByteTokenizer()
    assert tok.apply_chat_template(messages, tools=tools) == tok.encode(want)


@pytest.mark.parametrize(("messages", "tools", "error"), [
    ([{"role": "robot", "content": "x"}], None, "unknown role 'robot'"),
    ([{"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}], None,
     "each tool call needs a function name"),
    ([{"role": "user", "content": 3}], None, "content must be a string or a list"),
    ([{"role": "user", "content": "x"}], [{"f": object()}], "tools: not JSON"),
])
def test_builtin_errors(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                        error: str) -> None:
    with pytest.raises(ValueError, match=error):
        _chat_text(messages, True, tools)


QWEN_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content }}\
{%- else %}{{- 'You are Qwen.' }}{%- endif %}
{{- "\\n\\n# Tools\\n\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == "user" or (message.role == "system" and not loop.first) \
or (message.role == "assistant" and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == "assistant" %}
{{- '<|im_start|>' + message.role }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}\
{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == "tool" %}
{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != "tool" %}\
{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != "tool" %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

QWEN_RENDERED = (
    "<|im_start|>system\nYou are terse.\n\n# Tools\n\n<tools>\n" + TOOLS_JSON
    + "\n</tools><|im_end|>\n"
    "<|im_start|>user\nWeather in Zürich?<|im_end|>\n"
    '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
    '{"city": "Zürich"}}\n</tool_call><|im_end|>\n'
    '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response>\n<tool_response>\n'
    "sunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n")

QWEN_MESSAGES = [*CONVERSATION, {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]


def test_model_template_with_tools() -> None:
    template = ChatTemplate(QWEN_TEMPLATE, {})
    assert template.render(QWEN_MESSAGES, True, tools=TOOLS) == QWEN_RENDERED
    # OpenAI-style arguments (JSON text) render as the dict the template expects, as in vLLM;
    # the caller's messages are not changed.
    as_text = json.loads(json.dumps(QWEN_MESSAGES))
    as_text[2]["tool_calls"][0]["function"]["arguments"] = '{"city": "Zürich"}'
    assert template.render(as_text, True, tools=TOOLS) == QWEN_RENDERED
    assert as_text[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Zürich"}'
    without = template.render([{"role": "user", "content": "hi"}], False)
    assert without == "<|im_start|>user\nhi<|im_end|>\n"


def test_model_template_matches_transformers() -> None:
    pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    for tools in (TOOLS, None):
        want, _ = render_jinja_template(conversations=[QWEN_MESSAGES], tools=tools,
                                        chat_template=QWEN_TEMPLATE, add_generation_prompt=True)
        assert ChatTemplate(QWEN_TEMPLATE, {}).render(QWEN_MESSAGES, True, tools=tools) == want[0]


@pytest.mark.parametrize(("source", "messages", "want"), [
    ("{{ messages[0].content | tojson }}", [{"content": "é <b> & \"q\""}],
     '"é <b> & \\"q\\""'),
    ("{{ messages[0].d | tojson(indent=1) }}", [{"d": {"z": 1, "a": [2]}}],
     '{\n "z": 1,\n "a": [\n  2\n ]\n}'),
    ("{{ messages[0].d | tojson(sort_keys=true, separators=(',', ':')) }}",
     [{"d": {"z": 1, "a": 2}}], '{"a":2,"z":1}'),
    ("{{ messages[0].reasoning_content }}|{{ messages[0].thinking }}",
     [{"role": "assistant", "reasoning": "why"}], "why|why"),
    ("{{ strftime_now('%Y') }}", [], str(datetime.now().year)),
    ("{{ tools is none }}|{{ documents is none }}", [], "True|True"),
])
def test_template_environment(source: str, messages: list[dict[str, Any]], want: str) -> None:
    assert ChatTemplate(source, {}).render(messages, False) == want


@pytest.mark.parametrize(("source", "error"), [
    ("{{ raise_exception('nope') }}", "chat template: nope"),
    ("{{ messages[0].x | tojson }}", "chat template: .*not JSON serializable"),
])
def test_template_errors(source: str, error: str) -> None:
    with pytest.raises(ValueError, match=f"^{error}"):
        ChatTemplate(source, {}).render([{"x": object()}], True)


def test_hf_tokenizer_renders_tools(tmp_path: Path) -> None:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator([QWEN_RENDERED] * 5, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN_TEMPLATE}))
    tok = HFTokenizer(tmp_path)
    assert tok.apply_chat_template(QWEN_MESSAGES, tools=TOOLS) == tok.encode(QWEN_RENDERED,
                                                                            add_bos=False)
