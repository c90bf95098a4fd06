"""Anthropic Messages, OpenAI Responses and chat tool calls through the real gateway (mesh path)
with the official `anthropic` and `openai` SDKs as clients, sync and streaming, behind a worker
that replays scripted completions (`support.scripted_worker`: random weights cannot make a real
tool call). The worker's prompts show what the chat template made of each conversation."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import openai
import pytest
from support.net import free_port
from support.scripted_worker import ScriptedWorker

from meshd.coordinator.gateway.config import GatewayConfig, RecordsConfig
from meshd.coordinator.gateway.runtime import GatewayRuntime

WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}
OPENAI_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": WEATHER["input_schema"]}}
RESPONSES_WEATHER = {"type": "function", "name": "get_weather",
                     "description": "The weather in a city.",
                     "parameters": WEATHER["input_schema"]}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@dataclass
class Mesh:
    worker: ScriptedWorker
    rt: GatewayRuntime
    url: str

    def anthropic(self) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url=self.url, api_key="x", max_retries=0)

    def openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    worker = ScriptedWorker()
    await worker.start()
    cfg = GatewayConfig(port=free_port(), static_workers=(worker.url,),
                        records=RecordsConfig(dir=str(tmp_path / "records")))
    rt = GatewayRuntime(cfg)
    await rt.start()
    try:
        yield Mesh(worker, rt, f"http://127.0.0.1:{cfg.port}")
    finally:
        await rt.stop(2)
        await worker.stop()


async def test_an_anthropic_tool_call_chain_round_trips_with_the_tools_in_the_prompt(
        mesh: Mesh) -> None:
    mesh.worker.script("Let me look." + CALL, "It is sunny in Paris.")
    client = mesh.anthropic()
    first = await client.messages.create(
        model="scripted", max_tokens=200, tools=[WEATHER],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert first.stop_reason == "tool_use"
    kinds = [b.type for b in first.content]
    assert kinds == ["text", "tool_use"]
    use = first.content[1]
    assert use.type == "tool_use" and use.name == "get_weather"
    assert use.input == {"city": "Paris"} and use.id.startswith("toolu_")
    prompt = mesh.worker.prompt_text()
    assert "<tools>" in prompt and '"get_weather"' in prompt and "Weather in Paris?" in prompt
    assert first.usage.input_tokens == len(mesh.worker.prompts[-1])

    second = await client.messages.create(
        model="scripted", max_tokens=200, tools=[WEATHER],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": first.content},  # type: ignore[typeddict-item]
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                "content": "sunny, 21C"}]}])
    counted = await client.messages.count_tokens(
        model="scripted", tools=[WEATHER],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": first.content},  # type: ignore[typeddict-item]
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                "content": "sunny, 21C"}]}])
    assert counted.input_tokens == len(mesh.worker.prompts[-1])  # what the worker was sent
    assert second.stop_reason == "end_turn"
    assert [b.type for b in second.content] == ["text"]
    assert second.content[0].text == "It is sunny in Paris."  # type: ignore[union-attr]
    prompt = mesh.worker.prompt_text()
    assert "<tool_response>\nsunny, 21C\n</tool_response>" in prompt
    assert '"city": "Paris"' in prompt or '"city":"Paris"' in prompt  # the call, re-rendered


async def test_an_anthropic_stream_is_the_documented_event_sequence(mesh: Mesh) -> None:
    mesh.worker.script("Checking." + CALL)
    client = mesh.anthropic()
    names = []
    async with client.messages.stream(
            model="scripted", max_tokens=200, tools=[WEATHER],  # type: ignore[list-item]
            messages=[{"role": "user", "content": "Weather?"}]) as stream:
        async for event in stream:
            names.append(event.type)
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[0].text == "Checking."  # type: ignore[union-attr]
    assert final.content[1].input == {"city": "Paris"}  # type: ignore[union-attr]
    raw = [n for n in names if not n.endswith(("text", "input_json"))]  # SDK's derived events
    assert raw[0] == "message_start" and raw[-1] == "message_stop"
    assert raw.count("content_block_start") == raw.count("content_block_stop") == 2
    assert "message_delta" in raw


async def test_stop_sequences_and_max_tokens_map_to_anthropic_stop_reasons(mesh: Mesh) -> None:
    mesh.worker.script("one two STOP three", "abcdefghijklmnop", "cached")
    client = mesh.anthropic()
    r = await client.messages.create(model="scripted", max_tokens=50, stop_sequences=["STOP"],
                                     messages=[{"role": "user", "content": "count"}])
    assert (r.stop_reason, r.stop_sequence) == ("stop_sequence", "STOP")
    assert r.content[0].text == "one two "  # type: ignore[union-attr]
    r = await client.messages.create(model="scripted", max_tokens=4,
                                     messages=[{"role": "user", "content": "letters"}])
    assert r.stop_reason == "max_tokens" and r.usage.output_tokens <= 4
    mesh.worker.cached_tokens = 32  # the worker's prefix cache served 32 prompt tokens
    r = await client.messages.create(model="scripted", max_tokens=50,
                                     messages=[{"role": "user", "content": "x" * 60}])
    prompt = len(mesh.worker.prompts[-1])
    assert r.usage.cache_read_input_tokens == 32 and r.usage.input_tokens == prompt - 32


async def test_anthropic_errors_are_anthropic_shaped(mesh: Mesh) -> None:
    client = mesh.anthropic()
    with pytest.raises(anthropic.BadRequestError) as e:
        await client.messages.create(
            model="scripted", max_tokens=10,
            messages=[{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": [{"type": "tool_result",
                                                    "tool_use_id": "toolu_nope",
                                                    "content": "x"}]}])
    assert "unexpected tool_use_id found in tool_result blocks" in str(e.value)
    body = e.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.create(model="no-such-model", max_tokens=10,
                                     messages=[{"role": "user", "content": "hi"}])


async def test_openai_chat_tool_calls_streamed_and_not_and_continued_in_anthropic(
        mesh: Mesh) -> None:
    mesh.worker.script(CALL, CALL, "Sunny.")
    client = mesh.openai()
    r = await client.chat.completions.create(
        model="scripted", tools=[OPENAI_WEATHER],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "Weather in Paris?"}])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]

    stream = await client.chat.completions.create(
        model="scripted", tools=[OPENAI_WEATHER], stream=True,  # type: ignore[list-item]
        messages=[{"role": "user", "content": "Weather in Paris?"}])
    name, args, call_id, finish = "", "", "", None
    async for chunk in stream:
        for c in chunk.choices:
            for tc in c.delta.tool_calls or ():
                call_id = tc.id or call_id
                name += (tc.function.name or "") if tc.function else ""
                args += (tc.function.arguments or "") if tc.function else ""
            finish = c.finish_reason or finish
    assert (name, json.loads(args), finish) == ("get_weather", {"city": "Paris"}, "tool_calls")

    # the chain goes on in Anthropic's dialect with the OpenAI call's id
    a = await mesh.anthropic().messages.create(
        model="scripted", max_tokens=50, tools=[WEATHER],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": [{"type": "tool_use", "id": call_id,
                                                     "name": "get_weather",
                                                     "input": {"city": "Paris"}}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call_id,
                                                "content": "sunny"}]}])
    assert a.content[0].text == "Sunny."  # type: ignore[union-attr]


async def test_responses_stateless_stored_and_continued_by_previous_response_id(
        mesh: Mesh) -> None:
    mesh.worker.script(CALL, "It is sunny.", "Bonjour.")
    client = mesh.openai()
    first = await client.responses.create(model="scripted", input="Weather in Paris?",
                                          instructions="Be brief.",
                                          tools=[RESPONSES_WEATHER])  # type: ignore[list-item]
    assert first.status == "completed"
    call = first.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert "Be brief." in mesh.worker.prompt_text()

    second = await client.responses.create(
        model="scripted", previous_response_id=first.id, instructions="Be brief.",
        tools=[RESPONSES_WEATHER],  # type: ignore[list-item]
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert second.output_text == "It is sunny."
    prompt = mesh.worker.prompt_text()
    assert "Weather in Paris?" in prompt and "sunny" in prompt  # the stored turns came back

    events = []
    stream = await client.responses.create(model="scripted", input="Say hi in French.",
                                           stream=True)
    async for ev in stream:
        events.append(ev.type)
    assert events[0] == "response.created" and events[-1] == "response.completed"
    assert "response.output_text.delta" in events

    got = await client.responses.retrieve(second.id)  # stored, as the client got it
    assert got.id == second.id and got.output_text == "It is sunny."
    # its input items: everything the model was given, the first response's turns included
    items = await client.responses.input_items.list(second.id, order="asc")
    kinds = [(i.type, getattr(i, "role", None)) for i in items.data]
    assert kinds == [("message", "user"), ("function_call", None),
                     ("function_call_output", None)], kinds
    assert items.data[2].output == "sunny"  # type: ignore[union-attr]
    newest = await client.responses.input_items.list(second.id, limit=1)  # desc: newest first
    assert [i.id for i in newest.data] == [items.data[-1].id] and newest.has_more
    rest = await client.responses.input_items.list(second.id, limit=5, after=newest.data[0].id)
    assert [i.id for i in rest.data] == [i.id for i in reversed(items.data[:-1])]
    assert not rest.has_more
    for bad in ({"limit": 0}, {"order": "up"}, {"after": "nope"}):
        with pytest.raises(openai.BadRequestError):
            await client.responses.input_items.list(second.id, **bad)  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        await client.responses.input_items.list("resp_missing")
    assert (await client.responses.delete(second.id)) is None
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(second.id)
    with pytest.raises(openai.NotFoundError):  # forgotten: it cannot be continued either
        await client.responses.create(model="scripted", input="x",
                                      previous_response_id=second.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model="scripted", input="x",
                                      previous_response_id="resp_missing")
    with pytest.raises(openai.BadRequestError) as e:  # refused, never silently ignored
        await client.responses.create(model="scripted", input="x",
                                      text={"format": {"type": "json_object"}})
    assert "text.format" in str(e.value)  # no worker of the model enforces a format
    assert e.value.body["code"] == "unsupported_format"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        await mesh.openai().chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_object"})
    assert e.value.body["code"] == "unsupported_format"  # type: ignore[index]
    assert e.value.body["param"] == "response_format"  # type: ignore[index]


async def test_reasoning_is_kept_apart_in_every_dialect(tmp_path: Path) -> None:
    """A model with a reasoning parser (`qwen3`): its `<think>` block comes back as chat's
    `reasoning_content`, an Anthropic `thinking` block and a Responses `reasoning` item."""
    worker = ScriptedWorker()
    await worker.start()
    worker.script("<think>The user greets.</think>Hello!")
    cfg = GatewayConfig(port=free_port(), static_workers=(worker.url,),
                        reasoning_parsers={"scripted": "qwen3"})
    rt = GatewayRuntime(cfg)
    await rt.start()
    try:
        mesh = Mesh(worker, rt, f"http://127.0.0.1:{cfg.port}")
        chat = await mesh.openai().chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "hi"}])
        message = chat.choices[0].message
        assert message.content == "Hello!"
        assert (message.model_extra or {})["reasoning_content"] == "The user greets."
        a = await mesh.anthropic().messages.create(
            model="scripted", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
        assert [b.type for b in a.content] == ["thinking", "text"]
        assert a.content[0].thinking == "The user greets."  # type: ignore[union-attr]
        async with mesh.anthropic().messages.stream(
                model="scripted", max_tokens=50,
                messages=[{"role": "user", "content": "hi"}]) as stream:
            final = await stream.get_final_message()
        assert final.content[0].thinking == "The user greets."  # type: ignore[union-attr]
        r = await mesh.openai().responses.create(model="scripted", input="hi")
        assert [o.type for o in r.output] == ["reasoning", "message"]
        assert r.output_text == "Hello!"
    finally:
        await rt.stop(2)
        await worker.stop()


CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
        "additionalProperties": False}


async def test_structured_output_takes_the_mesh_path_on_the_workers_that_enforce_it(
        tmp_path: Path) -> None:
    """A `response_format` (chat) or `text.format` (Responses) is tokenized, governed and
    routed like any request, sent to the worker in chat's shape, and only to a worker that
    enforces it (the pool's probe found which): the other worker of the model refuses one,
    so a request routed there would fail. Bad formats are a clear 400."""
    strict, plain = ScriptedWorker(constrains=True), ScriptedWorker()
    for w in (strict, plain):
        await w.start()
    cfg = GatewayConfig(port=free_port(), static_workers=(strict.url, plain.url),
                        records=RecordsConfig(dir=str(tmp_path / "records")))
    rt = GatewayRuntime(cfg)
    await rt.start()
    try:
        rows = {r["worker_id"]: r for r in rt.pool.routing_state()}
        assert sum("constrained decoding" in str(r["protocol_detail"]) for r in rows.values()) \
            == 1, rows
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{cfg.port}/v1", api_key="x",
                                    max_retries=0)
        chat_fmt = {"type": "json_schema",
                    "json_schema": {"name": "city", "schema": CITY, "strict": True}}
        for i in range(4):
            strict.replies.clear()  # (the last reply is kept for every request after it)
            strict.script(f'{{"city": "Paris {i}"}}')
            chat = await client.chat.completions.create(
                model="scripted", messages=[{"role": "user", "content": f"where {i}?"}],
                response_format=chat_fmt, max_tokens=40)  # type: ignore[arg-type]
            assert json.loads(chat.choices[0].message.content or "") == {"city": f"Paris {i}"}
        assert [b["response_format"] for b in strict.bodies] == [chat_fmt] * 4
        assert all("response_format" not in b for b in plain.bodies)
        # Responses: text.format in its own shape, sent in chat's, echoed in its own
        strict.replies.clear()
        strict.script('{"city": "Rome"}')
        fmt = {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}
        resp = await client.responses.create(model="scripted", input="where?",
                                             text={"format": fmt})  # type: ignore[typeddict-item]
        assert json.loads(resp.output_text) == {"city": "Rome"}
        assert strict.bodies[-1]["response_format"] == chat_fmt
        assert resp.text is not None and resp.text.format is not None
        assert resp.text.format.type == "json_schema"
        strict.replies.clear()
        strict.script('{"a": 1}')
        stream = await client.chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_object"}, stream=True, max_tokens=40)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert json.loads(text) == {"a": 1}
        assert strict.bodies[-1]["response_format"] == {"type": "json_object"}
        for bad, param in (({"type": "yaml"}, "response_format.type"),
                           ({"type": "json_schema"}, "response_format.json_schema"),
                           ({"type": "json_schema", "json_schema": {"name": "n", "schema": 1}},
                            "response_format.json_schema.schema")):
            with pytest.raises(openai.BadRequestError) as e:
                await client.chat.completions.create(
                    model="scripted", messages=[{"role": "user", "content": "x"}],
                    response_format=bad)  # type: ignore[arg-type]
            assert e.value.body["param"] == param  # type: ignore[index]
    finally:
        await rt.stop(2)
        for w in (strict, plain):
            await w.stop()


async def test_an_enforced_tool_choice_is_sampled_under_a_schema(tmp_path: Path) -> None:
    """A named tool (OpenAI) or `any` (Anthropic), on a model whose worker enforces formats:
    the worker samples under the tool's parameters schema (or an array of calls) and the
    calls are read from that JSON; without such a worker the choice is only rendered by the
    template (not enforced), as documented."""
    strict = ScriptedWorker(constrains=True)
    await strict.start()
    cfg = GatewayConfig(port=free_port(), static_workers=(strict.url,),
                        records=RecordsConfig(dir=str(tmp_path / "records")))
    rt = GatewayRuntime(cfg)
    await rt.start()
    try:
        url = f"http://127.0.0.1:{cfg.port}"
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        strict.script('{"city": "Paris"}')
        chat = await client.chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[OPENAI_WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=60)
        choice = chat.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls or []
        assert call.function.name == "get_weather"  # type: ignore[union-attr]
        assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
        fmt = strict.bodies[-1]["response_format"]
        assert fmt == {"type": "json_schema", "json_schema": {
            "name": "get_weather", "schema": WEATHER["input_schema"]}}
        assert "get_weather" in strict.prompt_text()  # the template still renders the tools
        strict.replies.clear()
        strict.script('[{"name": "get_weather", "arguments": {"city": "Rome"}}]')
        a = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0)
        msg = await a.messages.create(
            model="scripted", max_tokens=60, tools=[WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "any"},
            messages=[{"role": "user", "content": "Weather in Rome?"}])
        assert msg.stop_reason == "tool_use"
        (use,) = msg.content
        assert use.type == "tool_use" and use.input == {"city": "Rome"}
        schema = strict.bodies[-1]["response_format"]["json_schema"]["schema"]
        assert schema["type"] == "array" and schema["minItems"] == 1
    finally:
        await rt.stop(2)
        await strict.stop()


async def test_a_tool_choice_is_not_enforced_where_no_worker_enforces_formats(
        mesh: Mesh) -> None:
    """The scripted worker here refuses formats (as meshd's embedded engine): a named tool
    choice is rendered by the template and the model's own call markup parsed, no format
    sent (a request with one would be refused there)."""
    mesh.worker.script(CALL)
    chat = await mesh.openai().chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[OPENAI_WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=200)
    assert chat.choices[0].message.tool_calls
    assert "response_format" not in mesh.worker.bodies[-1]
