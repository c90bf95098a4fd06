"""MoE expert-aware routing through the real gateway: the prefill's expert signal steers the
decode pick to the worker hosting the prompt's experts, and the opposite placement flips it.

Real engine processes (the built-in tiny MoE model: 8 experts, top-2, 4 layers), one prefill
worker and two decode workers dA and dB, the `openai` client. A separate worker is asked first
which experts each prompt activates. Its random weights spread every prompt's tokens over all
eight experts (no half holds much more than 60%), so each prompt gets its own placement: its
four most activated experts on one decode worker, the other four on the other, announced by a
membership update as an agent's re-registration would. Each direction runs on fresh engines:
a worker that cached a prompt would attract it by prefix and, as prefill, would compute (and
report experts for) only the uncached rest.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from support.mesh import EngineProc, engines, gateway
from support.moe import MODEL, MOE_FLAGS, generated, members, probe, share

ALL = frozenset(range(8))
# distinct first bytes: no two prompts share a KV block
PROMPTS = ["quantum " * 8, "lorem ipsum dolor " * 6, "AAAA " * 10, "~~~### " * 8,
           "0000 " * 10, "zebra " * 8]


@pytest.fixture(scope="module")
def top(tmp_path_factory: pytest.TempPathFactory) -> dict[str, frozenset[int]]:
    """Prompt -> its four most activated experts, asked of a worker outside the mesh."""
    out = {}
    with engines([("probe", "both")], tmp_path_factory.mktemp("probe"),
                 extra=MOE_FLAGS) as [worker]:
        for p in PROMPTS:
            got = probe(worker, p)
            assert sum(got.activated.values()) == 2 * 4 * (len(p.encode()) + 1)  # +1: BOS
            ranked = sorted(got.activated, key=lambda e: (-got.activated[e], e))[:4]
            # the answer carries the top experts with their token counts, most used first
            assert list(got.reported) == ranked
            assert got.reported == {e: got.activated[e] for e in ranked}
            out[p] = frozenset(ranked)
            assert share(got.activated, out[p]) > 0.5  # dA or dB hosts most of them
    return out


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[list[EngineProc]]:
    with engines([("p0", "prefill"), ("dA", "decode"), ("dB", "decode")], tmp_path,
                 extra=MOE_FLAGS) as procs:
        yield procs


@pytest.mark.parametrize("first", ["dA", "dB"])
async def test_decode_goes_to_the_worker_hosting_the_prompts_experts(
        top: dict[str, frozenset[int]], mesh: list[EngineProc], first: str) -> None:
    decoders = [e for e in mesh if e.worker.role == "decode"]
    other = {"dA": "dB", "dB": "dA"}
    hosts = [first if i % 2 == 0 else other[first] for i in range(len(PROMPTS))]
    served = []
    async with gateway(members(mesh, {})) as (url, handler):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        for p, host in zip(PROMPTS, hosts, strict=True):
            handler.pool.update(members(mesh, {host: top[p], other[host]: ALL - top[p]}))
            assert {v.worker_id: v.experts for v in handler.pool.views()} == {
                "p0": frozenset(), host: top[p], other[host]: ALL - top[p]}
            before = [generated(e) for e in decoders]
            r = await client.completions.create(model=MODEL, prompt=p, max_tokens=4,
                                                temperature=0)
            assert r.usage is not None and r.usage.completion_tokens == 4
            grew = [e.worker.worker_id for e, b in zip(decoders, before, strict=True)
                    if generated(e) > b]
            served.append(grew)
        assert handler.counters.disaggregated == len(PROMPTS)  # every prefill on p0
    assert served == [[h] for h in hosts]
