"""Issue 12 §3 through the real gateway and a real embedded engine (the `openai` client):
confidence reported in `usage`, the client's own logprobs unchanged, a stream halted below a
threshold (distinct finish_reason, a final chunk saying why, the worker's request ended at
once), thresholds per request (header) and per tenant, and the metrics."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from support.mesh import engines, worker_metric
from support.net import free_port

from meshd.capabilities import Member
from meshd.coordinator.gateway.config import GatewayConfig, RoutingConfig
from meshd.coordinator.gateway.governance.config import GovernanceConfig
from meshd.coordinator.gateway.runtime import GatewayRuntime
from meshd.coordinator.gateway.serving.confidence import ConfidenceConfig

KEYS = {"plain": "key-plain-00001", "strict": "key-strict-0001"}
PROMPT = "Tell me a long story about the sea and the ships that sail on it. " * 2


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    with engines([("b0", "both")], tmp_path) as [b0]:
        async def membership() -> list[Member]:
            return [Member("n0", b0.worker)]

        gov = GovernanceConfig(tenants={
            "plain": {"api_keys": [KEYS["plain"]]},
            "strict": {"api_keys": [KEYS["strict"]], "confidence_halt_below": 0.999}})
        rt = GatewayRuntime(GatewayConfig(
            port=free_port(), membership_interval_s=60, governance=gov,
            routing=RoutingConfig(scrape_interval_s=0.1),
            confidence=ConfidenceConfig(enabled=True, window=8)), membership)
        await rt.start()
        clients: list[openai.AsyncOpenAI] = []
        try:
            yield {"url": f"http://127.0.0.1:{rt.config.port}", "b0": b0, "clients": clients,
                   "rt": rt}
        finally:
            for c in clients:  # closed on this loop: no transport finalized on a dead one
                await c.close()
            await rt.stop(2)


def client(m: dict[str, Any], tenant: str = "plain") -> openai.AsyncOpenAI:
    c = openai.AsyncOpenAI(base_url=m["url"] + "/v1", api_key=KEYS[tenant], max_retries=0,
                           timeout=60)
    m["clients"].append(c)
    return c


async def test_confidence_is_reported_and_logprobs_stay_the_clients(
        mesh: dict[str, Any]) -> None:
    c = client(mesh)
    out = await c.completions.create(model="meshd-tiny", prompt=PROMPT, max_tokens=12,
                                     temperature=0)
    assert out.choices[0].logprobs is None  # asked of the worker for the meter only
    conf = (out.usage.model_extra or {})["meshd"] if out.usage else {}
    assert conf["tokens_scored"] == 12 and conf["halted"] == 0
    assert 0.0 < conf["confidence_min"] <= conf["confidence_mean"] <= 1.0
    # the engine scores its own tokens (exact, one float each: probed when it joined), so the
    # meter asked it for those instead of top-k logprobs
    rt = mesh["rt"]
    assert rt.pool.scores_itself(mesh["b0"].worker.worker_id)
    assert rt.handler.confidence_cost.describe()["deltas"] >= 1
    mine = await c.completions.create(model="meshd-tiny", prompt=PROMPT, max_tokens=4,
                                      temperature=0, logprobs=2)
    lp = mine.choices[0].logprobs
    assert lp is not None and lp.top_logprobs is not None
    assert all(len(top) <= 2 for top in lp.top_logprobs)  # the client's 2, not the meter's 5
    chat = await c.chat.completions.create(
        model="meshd-tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=6,
        temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = [ch async for ch in chat]
    assert all(ch.choices[0].logprobs is None for ch in chunks if ch.choices)
    final = chunks[-1].usage
    assert final is not None and (final.model_extra or {})["meshd"]["tokens_scored"] == 6


async def test_a_stream_below_the_threshold_is_halted_and_the_worker_stops(
        mesh: dict[str, Any]) -> None:
    b0 = mesh["b0"]
    aborts = worker_metric(b0.url, "meshd_engine_aborts_total")
    stream = await client(mesh).completions.create(
        model="meshd-tiny", prompt=PROMPT, max_tokens=200, temperature=1.0, seed=7,
        stream=True, extra_headers={"x-meshd-halt-below": "0.999"})
    chunks = [ch async for ch in stream]
    last = chunks[-1].choices[0]
    assert last.finish_reason == "low_confidence"
    assert "below 0.999" in (last.model_extra or {})["meshd"]["halted"]
    produced = sum(1 for ch in chunks if ch.choices and ch.choices[0].text)
    assert produced < 200
    deadline = time.monotonic() + 10  # the worker saw the connection go: the request ends
    while worker_metric(b0.url, "meshd_engine_aborts_total") <= aborts:
        assert time.monotonic() < deadline, "the worker kept generating a halted request"
        time.sleep(0.1)
    assert worker_metric(b0.url, "vllm:num_requests_running") == 0
    # the tenant's threshold halts a non-streamed request the same way
    out = await client(mesh, "strict").completions.create(
        model="meshd-tiny", prompt=PROMPT, max_tokens=200, temperature=1.0, seed=7)
    assert out.choices[0].finish_reason == "low_confidence"
    assert out.usage is not None and out.usage.completion_tokens < 200
    assert (out.usage.model_extra or {})["meshd"]["halted"] == 1
    # a threshold of 0 scores without halting; a bad header is a 400
    fine = await client(mesh, "strict").completions.create(
        model="meshd-tiny", prompt=PROMPT, max_tokens=10, extra_headers={
            "x-meshd-halt-below": "0"})
    assert fine.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError):
        await client(mesh).completions.create(model="meshd-tiny", prompt=PROMPT, max_tokens=2,
                                              extra_headers={"x-meshd-halt-below": "high"})
    async with aiohttp.ClientSession() as s, s.get(mesh["url"] + "/metrics") as r:
        text = await r.text()
    assert re.search(r"^meshd_confidence_halts_total 2\.0$", text, re.M), text[-2000:]
    assert "meshd_choice_confidence_bucket" in text
