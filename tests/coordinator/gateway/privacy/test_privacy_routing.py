"""Issue 12 §1 through the real gateway: a live replica over real engine processes on nodes of
two classes (a restricted prefill + decode pair, a public colocating worker), the `openai`
client. Sensitive requests (detected, declared by header, or by the tenant's policy) are
prefilled and decoded on restricted workers only, their KV crossing only between those; with
no eligible worker they are refused or masked as the tenant's policy says; every decision is
counted."""

from __future__ import annotations

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
from meshd.coordinator.gateway.privacy.config import PrivacyConfig
from meshd.coordinator.gateway.runtime import GatewayRuntime
from meshd.scheduler.pd import PDConfig

KEYS = {"refuse": "key-refuse-0001", "mask": "key-masked-0001", "always": "key-always-0001"}
SENSITIVE = "Please email the merger plan to jane.doe@example.com before noon. " * 3
CLEAN = "Please send the quarterly summary to the team before noon today. " * 3


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    with engines([("sec-p", "prefill"), ("sec-d", "decode"), ("pub-b", "both")],
                 tmp_path) as procs:
        sec_p, sec_d, pub = procs
        members = [Member("n-sec", sec_p.worker, {"privacy": "restricted"}),
                   Member("n-sec", sec_d.worker, {"privacy": "restricted"}),
                   Member("n-pub", pub.worker, {})]
        current = list(members)

        async def membership() -> list[Member]:
            return list(current)

        gov = GovernanceConfig(tenants={
            "refuse": {"api_keys": [KEYS["refuse"]]},
            "mask": {"api_keys": [KEYS["mask"]], "privacy_action": "mask"},
            "always": {"api_keys": [KEYS["always"]], "privacy_always": True}})
        rt = GatewayRuntime(GatewayConfig(
            port=free_port(), membership_interval_s=60, governance=gov,
            routing=RoutingConfig(scrape_interval_s=0.1, pd=PDConfig(min_uncached_tokens=0)),
            privacy=PrivacyConfig(enabled=True)), membership)
        await rt.start()
        clients: list[openai.AsyncOpenAI] = []
        try:
            yield {"rt": rt, "url": f"http://127.0.0.1:{rt.config.port}", "members": current,
                   "sec_p": sec_p, "sec_d": sec_d, "pub": pub, "all": members,
                   "clients": clients}
        finally:
            for c in clients:  # closed on this loop: no transport finalized on a dead one
                await c.close()
            await rt.stop(2)


def client(m: dict[str, Any], tenant: str) -> openai.AsyncOpenAI:
    c = openai.AsyncOpenAI(base_url=m["url"] + "/v1", api_key=KEYS[tenant], max_retries=0,
                           timeout=60)
    m["clients"].append(c)
    return c


def prompt_tokens(m: dict[str, Any]) -> dict[str, float]:
    return {k: worker_metric(m[k].url, "vllm:prompt_tokens_total")
            for k in ("sec_p", "sec_d", "pub")}


async def privacy_state(m: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(m["url"] + "/debug/governance") as r:
        return (await r.json())["privacy"]  # type: ignore[no-any-return]


async def test_sensitive_requests_run_only_on_eligible_nodes(mesh: dict[str, Any]) -> None:
    c = client(mesh, "refuse")
    pulls = worker_metric(mesh["sec_d"].url, "meshd_engine_kv_transfer_pulls_total")
    before = prompt_tokens(mesh)
    out = await c.completions.create(model="meshd-tiny", prompt=SENSITIVE, max_tokens=4,
                                     temperature=0)
    assert out.usage is not None and out.usage.completion_tokens == 4
    stream = await c.chat.completions.create(
        model="meshd-tiny", messages=[{"role": "user", "content": SENSITIVE + " (chat)"}],
        max_tokens=4, temperature=0, stream=True)
    finishes = [ch.choices[0].finish_reason async for ch in stream if ch.choices]
    assert finishes[-1] == "length"
    declared = await c.completions.create(  # clean text, marked sensitive by the client
        model="meshd-tiny", prompt=CLEAN + " (declared)", max_tokens=2, temperature=0,
        extra_headers={"x-meshd-privacy": "sensitive"})
    assert declared.usage is not None
    always = await client(mesh, "always").completions.create(  # the tenant's policy
        model="meshd-tiny", prompt=CLEAN + " (always)", max_tokens=2, temperature=0)
    assert always.usage is not None
    after = prompt_tokens(mesh)
    assert after["pub"] == before["pub"], "a sensitive prompt reached the public node"
    assert after["sec_p"] > before["sec_p"]  # prefilled on the restricted prefill worker,
    assert worker_metric(mesh["sec_d"].url, "meshd_engine_kv_transfer_pulls_total") > pulls
    # ... its KV pulled by the restricted decode worker (a prefix it caches stays there)
    state = await privacy_state(mesh)
    assert state["decisions"]["restricted"] == 4 and state["findings"]["email"] >= 2
    async with aiohttp.ClientSession() as s, s.get(mesh["url"] + "/metrics") as r:
        assert 'meshd_privacy_requests_total{decision="restricted"} 4.0' in await r.text()


async def test_no_eligible_node_refuses_or_masks_as_the_tenant_says(
        mesh: dict[str, Any]) -> None:
    rt, members = mesh["rt"], mesh["members"]
    members[:] = [m for m in mesh["all"] if m.node_id == "n-pub"]  # the restricted node left
    await rt.refresh()
    with pytest.raises(openai.PermissionDeniedError) as e:
        await client(mesh, "refuse").completions.create(model="meshd-tiny", prompt=SENSITIVE,
                                                        max_tokens=2)
    err = e.value.body
    assert isinstance(err, dict) and err["code"] == "sensitive_data_refused"
    assert "email x3" in err["message"] and "restricted" in err["message"]
    assert "jane.doe" not in err["message"]  # what was found, never the values
    with pytest.raises(openai.PermissionDeniedError):  # declared sensitive: nothing to mask
        await client(mesh, "mask").completions.create(
            model="meshd-tiny", prompt=CLEAN, max_tokens=2,
            extra_headers={"x-meshd-privacy": "sensitive"})
    masked = await client(mesh, "mask").completions.create(
        model="meshd-tiny", prompt="Contact jane.doe@example.com now.", max_tokens=2)
    literal = await client(mesh, "mask").completions.create(
        model="meshd-tiny", prompt="Contact [EMAIL] now.", max_tokens=2)
    assert masked.usage is not None and literal.usage is not None
    assert masked.usage.prompt_tokens == literal.usage.prompt_tokens  # the worker got [EMAIL]
    ok = await client(mesh, "refuse").completions.create(model="meshd-tiny", prompt=CLEAN,
                                                         max_tokens=2)
    assert ok.usage is not None  # clean requests still go anywhere
    with pytest.raises(openai.BadRequestError):
        await client(mesh, "refuse").completions.create(
            model="meshd-tiny", prompt=CLEAN, max_tokens=2,
            extra_headers={"x-meshd-privacy": "maybe"})
    state = await privacy_state(mesh)
    assert state["decisions"]["refused"] == 2 and state["decisions"]["masked"] == 1
    assert state["decisions"]["clean"] >= 2


async def test_a_token_id_prompt_is_read_as_its_text(mesh: dict[str, Any]) -> None:
    """A prompt sent as token ids is decoded with the model's tokenizer and scanned like
    text: restricted when an eligible node serves, refused or masked (sent on as the masked
    text) when none does. Its ids reach the eligible workers unchanged."""
    rt, members = mesh["rt"], mesh["members"]
    tok = rt.prompts.tokenizer("meshd-tiny")
    ids = tok.encode(SENSITIVE + " (ids)")
    before = prompt_tokens(mesh)
    out = await client(mesh, "refuse").completions.create(model="meshd-tiny", prompt=ids,
                                                          max_tokens=2, temperature=0)
    assert out.usage is not None and out.usage.prompt_tokens == len(ids)
    after = prompt_tokens(mesh)
    assert after["pub"] == before["pub"] and after["sec_p"] > before["sec_p"]
    members[:] = [m for m in mesh["all"] if m.node_id == "n-pub"]
    await rt.refresh()
    with pytest.raises(openai.PermissionDeniedError) as e:
        await client(mesh, "refuse").completions.create(model="meshd-tiny", prompt=ids,
                                                        max_tokens=2)
    assert isinstance(e.value.body, dict) and "email x3" in e.value.body["message"]
    masked = await client(mesh, "mask").completions.create(
        model="meshd-tiny", prompt=tok.encode("Contact jane.doe@example.com now."),
        max_tokens=2)
    literal = await client(mesh, "mask").completions.create(
        model="meshd-tiny", prompt="Contact [EMAIL] now.", max_tokens=2)
    assert masked.usage is not None and literal.usage is not None
    assert masked.usage.prompt_tokens == literal.usage.prompt_tokens
    state = await privacy_state(mesh)
    assert state["decisions"] == {"clean": 1, "restricted": 1, "masked": 1, "refused": 1}
