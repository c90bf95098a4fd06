"""Several models in one mesh (issue 14 §5): `/v1/models` lists them, each request goes to a
worker of its model only, and each model's prompt is its own tokenizer's and chat template's
— one on meshd's built-in byte tokenizer, one on a Qwen-style HF tokenizer whose template
renders tools (and whose tool-call format the gateway picks from that template)."""

from __future__ import annotations

import json
from pathlib import Path

import openai
from support.net import free_port
from support.scripted_worker import ScriptedWorker
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from meshd.coordinator.gateway.config import GatewayConfig
from meshd.coordinator.gateway.runtime import GatewayRuntime
from meshd.node_agent.engine.tokenizer import ByteTokenizer, HFTokenizer

QWEN = """{%- if tools %}<|im_start|>system
# Tools
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>
Call a function as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}{%- for message in messages %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}}}}}


def make_qwen_tokenizer(path: Path) -> HFTokenizer:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = ["<|im_start|>user\nhello there<|im_end|>\n<tool_call>lookup</tool_call>"] * 5
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN}))
    return HFTokenizer(path)


async def test_two_models_each_with_its_own_workers_tokenizer_and_template(
        tmp_path: Path) -> None:
    qwen = make_qwen_tokenizer(tmp_path)
    alpha, beta = ScriptedWorker("alpha"), ScriptedWorker("beta", tokenizer=qwen)
    for w in (alpha, beta):
        await w.start()
    alpha.script("from alpha")
    beta.script('<tool_call>\n{"name": "lookup", "arguments": {"q": "mesh"}}\n</tool_call>')
    cfg = GatewayConfig(port=free_port(), static_workers=(alpha.url, beta.url),
                        tokenizers={"beta": str(tmp_path)})
    rt = GatewayRuntime(cfg)
    await rt.start()
    try:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{cfg.port}/v1", api_key="x",
                                    max_retries=0)
        assert sorted(m.id for m in (await client.models.list()).data) == ["alpha", "beta"]
        a = await client.chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": "hello there"}])
        assert a.choices[0].message.content == "from alpha"
        assert alpha.prompts[0] == ByteTokenizer().apply_chat_template(  # the built-in one
            [{"role": "user", "content": "hello there"}])
        b = await client.chat.completions.create(
            model="beta", tools=[TOOL],  # type: ignore[list-item]
            messages=[{"role": "user", "content": "hello there"}])
        calls = b.choices[0].message.tool_calls or []
        assert [c.function.name for c in calls] == ["lookup"]  # type: ignore[union-attr]
        assert json.loads(calls[0].function.arguments) == {"q": "mesh"}  # type: ignore[union-attr]
        prompt = beta.prompt_text()
        assert prompt.startswith("<|im_start|>system\n# Tools\n<tools>")
        assert rt.handler.parsers.names("beta", True) == ("hermes", "none")  # from its template
        assert '"name": "lookup"' in prompt and prompt.endswith("<|im_start|>assistant\n")
        assert len(alpha.prompts) == 1 and len(beta.prompts) == 1  # no cross-routing
        with_unknown = client.chat.completions.create(
            model="gamma", messages=[{"role": "user", "content": "hi"}])
        try:
            await with_unknown
        except openai.NotFoundError as e:
            assert "gamma" in str(e)
        else:
            raise AssertionError("an unknown model must be 404")
    finally:
        await rt.stop(2)
        for w in (alpha, beta):
            await w.stop()
