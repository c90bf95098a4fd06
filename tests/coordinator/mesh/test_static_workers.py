"""Static workers: meshd in front of servers an operator already runs, given by URL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
from support.fake import load_fake_backend
from support.mesh import engines
from support.net import free_port

from meshd.coordinator.gateway.config import GatewayConfig, RoutingConfig
from meshd.coordinator.gateway.runtime import GatewayRuntime
from meshd.scheduler.pd import PDConfig


async def test_vllm_protocol_and_plain_openai_static_workers(tmp_path: Path) -> None:
    fake = load_fake_backend().FakeBackend(chunks=3)
    fake_port = await fake.start()
    with engines([("p0", "prefill"), ("d0", "decode")], tmp_path) as (p0, d0):
        settings = GatewayConfig(
            port=free_port(), routing=RoutingConfig(pd=PDConfig(min_uncached_tokens=0)),
            static_workers=(f"prefill={p0.url}", f"decode={d0.url}",
                            f"openai=http://127.0.0.1:{fake_port}"))
        rt = GatewayRuntime(settings)
        await rt.start()
        try:
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{settings.port}/v1",
                                        api_key="x", max_retries=0)
            assert sorted(m.id for m in (await client.models.list()).data) == [
                "fake", "meshd-tiny"]
            r = await client.completions.create(model="meshd-tiny", prompt="static " * 20,
                                                max_tokens=4, temperature=0)
            assert r.usage is not None and r.usage.completion_tokens == 4
            assert rt.handler.counters.disaggregated == 1  # p0 prefilled, d0 decoded
            f = await client.chat.completions.create(
                model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
            assert f.choices[0].message.content  # proxied to the plain server as sent
            stream = await client.completions.create(model="fake", prompt="x", max_tokens=3,
                                                     stream=True)
            assert len([c async for c in stream]) >= 3
        finally:
            await rt.stop(2)
            await asyncio.sleep(0)


async def test_admission_limit_answers_429_with_retry_after() -> None:
    import aiohttp

    fake = load_fake_backend().FakeBackend(chunks=20)
    fake_port = await fake.start()
    settings = GatewayConfig(port=free_port(),
                             static_workers=(f"openai=http://127.0.0.1:{fake_port}",))
    rt = GatewayRuntime(settings)
    rt.handler.max_inflight = 1
    await rt.start()
    url = f"http://127.0.0.1:{settings.port}/v1/completions"
    try:
        async with aiohttp.ClientSession() as http:
            slow = {"model": "fake", "prompt": "x", "stream": True, "fake_delay": 0.1}
            async with http.post(url, json=slow) as first:
                await first.content.readline()  # the first request is in flight
                async with http.post(url, json={"model": "fake", "prompt": "y"}) as second:
                    assert second.status == 429
                    assert second.headers.get("retry-after") == "1"
                    err = (await second.json())["error"]
                    assert err["type"] == "rate_limit_error" and "limit" in err["message"]
            status = 0
            for _ in range(40):  # the disconnect cancels the first request within moments
                async with http.post(url, json={"model": "fake", "prompt": "z"}) as third:
                    status = third.status
                if status == 200:
                    break
                await asyncio.sleep(0.05)
            assert status == 200
    finally:
        await rt.stop(2)
