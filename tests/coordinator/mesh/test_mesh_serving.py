"""The mesh gateway end to end: real engine processes, real HTTP, the `openai` client."""

from __future__ import annotations

import time
from collections.abc import Iterator

import openai
import pytest
from support.mesh import EngineProc, engines, gateway

PROMPT = "The mesh routes prefill and decode to different workers. " * 3


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[EngineProc]]:
    with engines([("p0", "prefill"), ("d0", "decode")], tmp_path_factory.mktemp("mesh")) as e:
        yield e


def clean(e: EngineProc, timeout_s: float = 5.0) -> None:
    """No block held or referenced once requests are done (leases end within their timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        kv = e.get("/debug/kv")
        if (kv["held"] == 0 and kv["free_blocks"] == kv["num_blocks"]) or \
                time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert kv["integrity"] == "ok" and kv["held"] == 0 and kv["leases"] == 0, kv
    assert kv["free_blocks"] == kv["num_blocks"], kv


async def test_openai_client_chat_completions_stream_n_logprobs(mesh: list[EngineProc]) -> None:
    async with gateway([e.worker for e in mesh]) as (url, handler):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        models = await client.models.list()
        assert [m.id for m in models.data] == ["meshd-tiny"]

        chat = await client.chat.completions.create(
            model="meshd-tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=8,
            temperature=0, logprobs=True, top_logprobs=2)
        assert chat.object == "chat.completion"
        assert chat.usage is not None and chat.usage.completion_tokens == 8
        assert chat.choices[0].finish_reason == "length"
        lp = chat.choices[0].logprobs
        assert lp is not None and lp.content is not None and len(lp.content) == 8
        assert all(len(t.top_logprobs) == 2 for t in lp.content)  # exactly, by token id
        assert handler.counters.disaggregated >= 1  # prefilled on p0, decoded on d0

        comp = await client.completions.create(model="meshd-tiny", prompt=PROMPT, max_tokens=6,
                                               temperature=0, n=3, logprobs=1)
        assert [c.index for c in comp.choices] == [0, 1, 2]
        assert len({c.text for c in comp.choices}) == 1  # greedy: the same for every choice
        assert comp.usage is not None and comp.usage.completion_tokens == 18
        assert comp.choices[0].logprobs is not None

        stream = await client.chat.completions.create(
            model="meshd-tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=5,
            temperature=0, stream=True, stream_options={"include_usage": True})
        pieces, usage, finish = [], None, None
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for c in chunk.choices:
                pieces.append(c.delta.content or "")
                finish = c.finish_reason or finish
        assert usage is not None and usage.completion_tokens == 5 and usage.prompt_tokens > 0
        assert finish == "length"
        assert "".join(pieces) == (chat.choices[0].message.content or "")[:len("".join(pieces))]

        sync = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = await __import__("asyncio").to_thread(
            sync.completions.create, model="meshd-tiny", prompt=PROMPT, max_tokens=3,
            temperature=0)
        assert r.usage is not None and r.usage.completion_tokens == 3
    for e in mesh:
        clean(e)


async def test_disaggregated_equals_colocated_token_for_token(mesh: list[EngineProc]) -> None:
    prompts = [PROMPT, "short prompt", "a" * 300]
    async with gateway([e.worker for e in mesh], min_uncached_tokens=0) as (url, handler):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        disagg = [await client.completions.create(model="meshd-tiny", prompt=p, max_tokens=12,
                                                  temperature=0) for p in prompts]
        assert handler.counters.disaggregated == 2  # "short prompt" has no full block to move
        await handler.pool.scrape_once()
        samples = {(s.name, s.labels.get("mode", "")): s.value
                   for m in handler.metrics.registry.collect() for s in m.samples}
        assert samples[("meshd_kv_transfer_bytes", "")] > 0  # summed from the decode worker
        assert samples[("meshd_prefill_total", "disaggregated")] == 2
        # a disaggregated request's prefix-cache hits are P's (none for a prompt new to it),
        # not the blocks D was sent, which D counts as cached; the second time, a hit
        fresh = "a prompt no other request of this module sends " * 4
        hits = []
        for _ in range(2):
            r = await client.completions.create(model="meshd-tiny", prompt=fresh,
                                                max_tokens=2, temperature=0)
            assert r.usage is not None and r.usage.prompt_tokens_details is not None
            hits.append(r.usage.prompt_tokens_details.cached_tokens)
        assert handler.counters.disaggregated >= 3  # the first was
        assert hits[0] == 0 and hits[1] > 0, hits
    async with gateway([e.worker for e in mesh], min_uncached_tokens=1 << 30) as (url, handler):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        local = [await client.completions.create(model="meshd-tiny", prompt=p, max_tokens=12,
                                                 temperature=0) for p in prompts]
        assert handler.counters.disaggregated == 0
    assert [c.choices[0].text for c in disagg] == [c.choices[0].text for c in local]
    for e in mesh:
        clean(e)


async def test_bad_input_is_a_clear_4xx_and_the_gateway_keeps_serving(
        mesh: list[EngineProc]) -> None:
    async with gateway([e.worker for e in mesh]) as (url, _):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            await client.completions.create(model="nope", prompt="x", max_tokens=2)
        tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
        for extra in ({"tools": tools}, {"response_format": {"type": "json_object"}}):
            with pytest.raises(openai.NotFoundError, match="does not exist"):  # was a 503
                await client.chat.completions.create(
                    model="nope", messages=[{"role": "user", "content": "x"}], **extra)
        with pytest.raises(openai.BadRequestError) as info:
            await client.completions.create(model="meshd-tiny", prompt="x" * 5000, max_tokens=2)
        assert "context" in str(info.value) or "length" in str(info.value)
        with pytest.raises(openai.BadRequestError):
            await client.completions.create(model="meshd-tiny", prompt="x", max_tokens=-1)
        ok = await client.completions.create(model="meshd-tiny", prompt="x", max_tokens=2)
        assert ok.usage is not None and ok.usage.completion_tokens == 2


async def test_stop_strings_through_the_mesh(mesh: list[EngineProc]) -> None:
    async with gateway([e.worker for e in mesh]) as (url, _):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        full = await client.completions.create(model="meshd-tiny", prompt=PROMPT, max_tokens=24,
                                               temperature=0)
        text = full.choices[0].text
        stop = next(text[i:i + 2] for i in range(3, len(text) - 1)
                    if text[i:i + 2].strip() and "\ufffd" not in text[i:i + 2])
        cut = await client.completions.create(model="meshd-tiny", prompt=PROMPT, max_tokens=24,
                                              temperature=0, stop=[stop])
        assert cut.choices[0].finish_reason == "stop"
        assert cut.choices[0].text == text[:text.index(stop)]
        stream = await client.chat.completions.create(
            model="meshd-tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=24,
            temperature=0, stop=[stop], stream=True)
        finishes = [c.choices[0].finish_reason async for c in stream if c.choices]
        assert finishes[-1] in ("stop", "length")
