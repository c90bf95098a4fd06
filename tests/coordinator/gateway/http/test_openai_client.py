"""The official `openai` client (sync, async, streaming) through the gateway to a fake worker."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import openai
import pytest

from meshd.coordinator.gateway.config import GatewayConfig

Stack = Any

MSGS = [{"role": "user", "content": "hi"}]


def make_client(s: Stack, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0, timeout=5)


def test_chat_sync(stack: Stack) -> None:
    r = make_client(stack).chat.completions.create(model="fake", messages=MSGS, max_tokens=8)
    assert r.choices[0].message.content == "hello there !"
    assert r.usage is not None and r.usage.total_tokens == 8


def test_completion_sync_token_ids(stack: Stack) -> None:
    c = make_client(stack)
    assert c.completions.create(model="fake", prompt="hi").choices[0].text == "hello there !"
    assert c.completions.create(model="fake", prompt=[1, 2, 3]).choices[0].text
    assert stack.backend.last_body["prompt"] == [1, 2, 3]


def test_stream_with_usage(stack: Stack) -> None:
    chunks = list(make_client(stack).chat.completions.create(
        model="fake", messages=MSGS, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "t0 t1 t2 t3 "
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


def test_async_client_concurrent_and_streaming(stack: Stack) -> None:
    async def main() -> None:
        c = openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key="x", max_retries=0)
        rs = await asyncio.gather(*(c.chat.completions.create(model="fake", messages=MSGS)
                                    for _ in range(20)))
        assert all(r.choices[0].message.content == "hello there !" for r in rs)
        stream = await c.completions.create(model="fake", prompt="x", stream=True)
        texts = [ch.choices[0].text async for ch in stream]
        assert texts == ["t0 ", "t1 ", "t2 ", "t3 "]
        await c.close()

    asyncio.run(main())


def test_request_id_echoed_and_passed_to_worker(stack: Stack) -> None:
    raw = make_client(stack).chat.completions.with_raw_response.create(
        model="fake", messages=MSGS, extra_headers={"X-Request-Id": "abc-123"},
        extra_body={"fake_unknown": 7})
    assert raw.headers["x-request-id"] == "abc-123"
    assert stack.backend.last_request_id == b"abc-123"
    assert stack.backend.last_body["fake_unknown"] == 7  # unknown fields pass through
    req = urllib.request.Request(stack.url + "/v1/chat/completions", method="POST",
                                 data=json.dumps({"model": "m", "messages": MSGS}).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.headers["x-request-id"].startswith("gw-")


def test_worker_error_status_passed_through(stack: Stack) -> None:
    with pytest.raises(openai.InternalServerError):
        make_client(stack).chat.completions.create(model="fake", messages=MSGS,
                                                   extra_body={"fake_status": 500})
    with pytest.raises(openai.InternalServerError):
        list(make_client(stack).chat.completions.create(
            model="fake", messages=MSGS, stream=True, extra_body={"fake_status": 503}))


def test_models(stack: Stack) -> None:
    assert [m.id for m in make_client(stack).models.list()] == ["fake"]


@pytest.fixture(scope="module")
def keyed(stack_factory: Any) -> Stack:
    return stack_factory(GatewayConfig(api_keys={"team-a": "sk-secret-a1"}))


def test_api_key(keyed: Stack) -> None:
    with pytest.raises(openai.AuthenticationError) as ei:
        make_client(keyed, "wrong-key").chat.completions.create(model="fake", messages=MSGS)
    assert ei.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        make_client(keyed, "wrong-key").models.list()
    r = make_client(keyed, "sk-secret-a1").chat.completions.create(model="f", messages=MSGS)
    assert r.choices
    with urllib.request.urlopen(keyed.url + "/health", timeout=5) as resp:  # no key needed
        assert resp.status == 200
