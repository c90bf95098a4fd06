"""A worker that does not return token ids never truncates text on the mesh path: it is found
when it joins (one probe), left out of the mesh path's routing, and a model only it serves is
proxied to it as plain OpenAI, with the reason on GET /debug/workers (what `meshd status`
shows)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import openai
import pytest
from support.fake import load_fake_backend
from support.net import free_port

from meshd.capabilities import Member, Worker
from meshd.commands.status import routing_section
from meshd.coordinator.gateway.config import GatewayConfig
from meshd.coordinator.gateway.runtime import GatewayRuntime
from meshd.coordinator.gateway.workers.client import BackendPool
from meshd.coordinator.gateway.workers.pool import WorkerPool
from meshd.coordinator.gateway.workers.protocol import MESH, PLAIN, UNKNOWN, probe


async def fake(token_ids: bool, chunks: int = 5) -> tuple[Any, int]:
    be = load_fake_backend().FakeBackend(chunks=chunks, token_ids=token_ids)
    return be, await be.start()


async def test_probe_tells_mesh_plain_and_unknown() -> None:
    with_ids, p1 = await fake(True)
    without, p2 = await fake(False)
    results = {}
    for name, port in (("ids", p1), ("no_ids", p2), ("down", free_port())):
        pool = BackendPool("127.0.0.1", port, connect_timeout=1.0)
        results[name] = await probe(pool, "fake", timeout_s=2.0)
        await pool.close()
    assert results["ids"].protocol == MESH
    assert results["no_ids"].protocol == PLAIN
    assert "ignores return_token_ids" in results["no_ids"].detail
    assert results["down"].protocol == UNKNOWN
    assert with_ids.last_body["return_token_ids"] is True and with_ids.last_body["max_tokens"] == 1
    for be in (with_ids, without):
        be.server.close()


async def test_probe_finds_the_workers_that_score_their_own_tokens() -> None:
    scorer = load_fake_backend().FakeBackend(chunks=3, scores=True)
    plain, p2 = await fake(True)
    got = {}
    for name, port in (("scores", await scorer.start()), ("logprobs", p2)):
        pool = BackendPool("127.0.0.1", port, connect_timeout=1.0)
        got[name] = await probe(pool, "fake", timeout_s=2.0)
        await pool.close()
    # (the fake answers a response_format as vLLM does: it takes it)
    assert got["scores"] == (MESH, "returns token ids, scores its tokens, constrained decoding",
                             True, True)
    assert got["logprobs"] == (MESH, "returns token ids, constrained decoding", False, True)
    assert scorer.recent[0]["meshd_confidence"] is True
    assert scorer.recent[1]["response_format"] == {"type": "json_object"}
    for be in (scorer, plain):
        be.server.close()


async def test_plain_worker_is_left_out_of_mesh_views() -> None:
    with_ids, p1 = await fake(True)
    without, p2 = await fake(False)
    pool = WorkerPool(follow_events=False)
    pool.update([Member("n", Worker("a", f"http://127.0.0.1:{p1}", "both", "fake")),
                 Member("n", Worker("b", f"http://127.0.0.1:{p2}", "both", "fake"))])
    assert [v.worker_id for v in pool.views()] == ["a", "b"]  # before the probe: as before
    await pool.probe_new()
    assert [v.worker_id for v in pool.views()] == ["a"]
    assert not pool.passthrough("fake")  # a mesh-capable worker serves the model
    assert pool.passthrough_workers("fake") == ["a", "b"]  # tools etc.: mesh-capable first
    rows = {r["worker_id"]: r for r in pool.routing_state()}
    assert (rows["a"]["protocol"], rows["b"]["protocol"]) == (MESH, PLAIN)
    await pool.close()
    for be in (with_ids, without):
        be.server.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_model_served_only_by_a_plain_worker_is_proxied_whole(stream: bool) -> None:
    without, port = await fake(False, chunks=7)
    cfg = GatewayConfig(port=free_port(), static_workers=(f"http://127.0.0.1:{port}",))
    rt = GatewayRuntime(cfg)
    await rt.start()
    try:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{cfg.port}/v1", api_key="x",
                                    max_retries=0)
        if stream:
            s = await client.completions.create(model="fake", prompt="hi", max_tokens=16,
                                                stream=True)
            text = "".join([c.choices[0].text async for c in s if c.choices])
            assert text == "".join(f"t{i} " for i in range(7))  # every chunk, nothing cut
        else:
            r = await client.completions.create(model="fake", prompt="hi", max_tokens=16)
            assert r.choices[0].text == "hello there !"
        assert "return_token_ids" not in without.last_body  # passed through as sent

        def workers() -> Any:
            with urllib.request.urlopen(f"http://127.0.0.1:{cfg.port}/debug/workers",
                                        timeout=5) as resp:
                return json.loads(resp.read())

        report = await asyncio.to_thread(workers)
        [row] = report["workers"]
        assert row["protocol"] == PLAIN and "return_token_ids" in row["protocol_detail"]
        line = routing_section("gw", report, "")
        assert "plain (ignores return_token_ids" in line and "static-0" in line
    finally:
        await rt.stop(2)
        without.server.close()
