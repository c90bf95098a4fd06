"""Governance on the mesh path with the real embedded engine: prompt tokens the worker served
from its prefix cache are priced at the cached rate, and the usage report shows what prefix
routing saved the tenant."""

from __future__ import annotations

import math
from pathlib import Path

import aiohttp
import openai
from support.mesh import engines
from support.net import free_port

from meshd.config import build
from meshd.coordinator.gateway.config import GatewayConfig
from meshd.coordinator.gateway.runtime import GatewayRuntime

KEY = "sk-acme-0123456789"
PRICE = {"input": 2.0, "cached_input": 0.5, "output": 4.0}  # USD per 1M tokens


def nano_usd(prompt: int, cached: int, completion: int) -> int:
    return math.ceil(((prompt - cached) * PRICE["input"] + cached * PRICE["cached_input"]
                      + completion * PRICE["output"]) * 1000)


async def test_cached_prompt_tokens_are_priced_as_cached(tmp_path: Path) -> None:
    with engines([("w0", "both")], tmp_path) as (w0,):
        cfg = build(GatewayConfig, {
            "port": free_port(), "static_workers": [w0.url], "api_keys": {"acme": KEY},
            "governance": {"tenants": {"acme": {"daily_budget_usd": 1.0}},
                           "prices": {"meshd-tiny": PRICE}}}, "gateway.")
        rt = GatewayRuntime(cfg)
        await rt.start()
        try:
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{cfg.port}/v1",
                                        api_key=KEY, max_retries=0)
            prompt = "the same long system prompt, block after block. " * 12
            usages = []
            for _ in range(2):
                r = await client.completions.create(model="meshd-tiny", prompt=prompt,
                                                    max_tokens=6, temperature=0)
                assert r.usage is not None
                usages.append(r.usage)
            cached = [u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details
                      else 0 for u in usages]
            assert cached[0] == 0 and cached[1] >= 16  # the second found the prefix cached
            async with aiohttp.ClientSession() as http, http.get(
                    f"http://127.0.0.1:{cfg.port}/v1/meshd/usage",
                    headers={"authorization": f"Bearer {KEY}"}) as resp:
                report = await resp.json()
            (row,) = report["data"]
            assert row["cached_tokens"] == sum(cached)
            expected = sum(nano_usd(u.prompt_tokens, c, u.completion_tokens)
                           for u, c in zip(usages, cached, strict=True))
            assert round(row["spend_usd"] * 1e9) == expected
            saved = sum(cached) * (PRICE["input"] - PRICE["cached_input"]) / 1e6
            assert math.isclose(row["cached_savings_usd"], saved)
            (daily,) = [m for m in report["limits"]["acme"] if m["limit"] == "daily_budget_usd"]
            assert math.isclose(daily["used"], expected / 1e9)
        finally:
            await rt.stop(2)
