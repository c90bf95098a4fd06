"""Issue 12 §2 through the real gateway, real embedded engines (P/D) and the `openai` client:
a receipt per completion when the tenant's policy or the request asks, in the body, the header
and a stream's last chunk; each verifies against `GET /v1/meshd/keys` (the gateway's key and
the trust store's node keys), with the prefill node named and the decode node's attestation;
one changed byte of text, token count or node id does not; a node's receipts after its
revocation do not; `meshd receipt verify` says the same offline."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from support.mesh import start_engine, wait_ready
from support.net import free_port

from meshd import cli, receipts
from meshd.capabilities import Member
from meshd.coordinator.actors import published_key
from meshd.coordinator.gateway import runtime as runtime_mod
from meshd.coordinator.gateway.config import GatewayConfig, ReceiptsConfig, RoutingConfig
from meshd.coordinator.gateway.governance.config import GovernanceConfig
from meshd.coordinator.gateway.runtime import GatewayRuntime
from meshd.coordinator.store import Store
from meshd.node_agent import identity
from meshd.scheduler.pd import PDConfig

KEYS = {"plain": "key-plain-00001", "audited": "key-audit-00001"}
PROMPT = "Summarise the harbour master's log for the week, ship by ship. " * 3


@pytest.fixture
async def mesh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[dict[str, Any]]:
    monkeypatch.setattr(runtime_mod, "KEYS_TTL_S", 0.0)  # a revocation shows at once
    secret = tmp_path / "kv_secret"
    secret.write_text("meshd-test-secret-0123456789abcdef\n")
    secret.chmod(0o600)
    store = Store(tmp_path / "coordinator")
    nodes, procs = {}, []
    for wid, role in (("p0", "prefill"), ("d0", "decode")):
        ident = identity.load_or_create(tmp_path / f"node-{wid}")
        store.add_key(ident.public_key, ident.node_id, wid)
        nodes[wid] = ident.node_id
        procs.append(start_engine(wid, role, secret, tmp_path,
                                  extra=["--attest-key-file", str(ident.path)]))
    try:
        wait_ready(procs)

        async def membership() -> list[Member]:
            return [Member(nodes[p.worker.worker_id], p.worker) for p in procs]

        async def node_keys() -> list[dict[str, Any]]:
            return [published_key(r) for r in store.list_keys()]

        gov = GovernanceConfig(tenants={
            "plain": {"api_keys": [KEYS["plain"]]},
            "audited": {"api_keys": [KEYS["audited"]], "receipts": True}})
        rt = GatewayRuntime(GatewayConfig(
            port=free_port(), membership_interval_s=60, governance=gov,
            routing=RoutingConfig(scrape_interval_s=0.1, pd=PDConfig(min_uncached_tokens=0)),
            receipts=ReceiptsConfig(key_file=str(tmp_path / "coordinator" / "receipt.key"))),
            membership, node_keys=node_keys)
        await rt.start()
        clients: list[openai.AsyncOpenAI] = []
        try:
            yield {"url": f"http://127.0.0.1:{rt.config.port}", "nodes": nodes,
                   "store": store, "clients": clients, "tmp": tmp_path, "rt": rt}
        finally:
            for c in clients:
                await c.close()
            await rt.stop(2)
    finally:
        for p in procs:
            p.kill()
        store.close()


def client(m: dict[str, Any], tenant: str = "audited") -> openai.AsyncOpenAI:
    c = openai.AsyncOpenAI(base_url=m["url"] + "/v1", api_key=KEYS[tenant], max_retries=0,
                           timeout=60)
    m["clients"].append(c)
    return c


async def published(m: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(
            m["url"] + "/v1/meshd/keys",
            headers={"authorization": f"Bearer {KEYS['plain']}"}) as r:
        assert r.status == 200
        doc: dict[str, Any] = await r.json()
        return doc


async def test_a_receipt_verifies_and_names_the_nodes(mesh: dict[str, Any]) -> None:
    c = client(mesh)
    raw = await c.chat.completions.with_raw_response.create(
        model="meshd-tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=8,
        temperature=0)
    out = raw.parse()
    receipt = (out.model_extra or {})["meshd"]["receipt"]
    header = raw.headers["x-meshd-receipt"]
    assert json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4))) == receipt
    keys = receipts.KeySet.from_json(await published(mesh))
    text = out.choices[0].message.content or ""
    result = receipts.verify(receipt, keys, {0: text})
    assert result.ok, result.problems
    assert result.notes == []
    (choice,) = receipt["choices"]
    assert receipt["tenant"] == "audited" and receipt["model"] == "meshd-tiny"
    assert out.usage is not None
    assert receipt["prompt"]["tokens"] == out.usage.prompt_tokens
    assert choice["completion_tokens"] == out.usage.completion_tokens == 8
    assert choice["prefill"]["node_id"] == mesh["nodes"]["p0"]  # disaggregated: P then D
    (seg,) = choice["segments"]
    assert seg["node_id"] == mesh["nodes"]["d0"] and seg["tokens"] == 8
    assert seg["attestation"]["prompt_sha256"] == receipt["prompt"]["sha256"]

    # one changed byte of text, token count or node id: not verified
    assert not receipts.verify(receipt, keys, {0: text[:-1] + chr(ord(text[-1]) ^ 1)}).ok
    for path, value in ((("choices", 0, "completion_tokens"), 7),
                        (("choices", 0, "segments", 0, "node_id"), mesh["nodes"]["p0"]),
                        (("choices", 0, "segments", 0, "attestation", "output_tokens"), 7)):
        bad = copy.deepcopy(receipt)
        obj: Any = bad
        for part in path[:-1]:
            obj = obj[part]
        obj[path[-1]] = value
        assert not receipts.verify(bad, keys, {0: text}).ok, path


async def test_a_streamed_receipt_comes_last_and_verifies(mesh: dict[str, Any]) -> None:
    c = client(mesh)
    stream = await c.completions.create(model="meshd-tiny", prompt=PROMPT, max_tokens=6,
                                        temperature=0, stream=True,
                                        stream_options={"include_usage": True})
    chunks = [ch async for ch in stream]
    last = (chunks[-1].model_extra or {}).get("meshd") or {}
    assert "receipt" in last and chunks[-1].choices == []
    assert chunks[-2].usage is not None  # the usage chunk, then the receipt
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    keys = receipts.KeySet.from_json(await published(mesh))
    result = receipts.verify(last["receipt"], keys, {0: text})
    assert result.ok, result.problems


async def test_who_gets_a_receipt(mesh: dict[str, Any]) -> None:
    """Off by default; on for a tenant whose policy says so; a request's header turns it on
    or off; a bad header is a 400."""
    plain = client(mesh, "plain")
    args: dict[str, Any] = {"model": "meshd-tiny", "prompt": PROMPT, "max_tokens": 2}
    out = await plain.completions.create(**args)
    assert "meshd" not in (out.model_extra or {})
    out = await plain.completions.create(**args, extra_headers={"x-meshd-receipt": "true"})
    assert "receipt" in (out.model_extra or {})["meshd"]
    audited = client(mesh)
    out = await audited.completions.create(**args, extra_headers={"x-meshd-receipt": "false"})
    assert "meshd" not in (out.model_extra or {})
    with pytest.raises(openai.BadRequestError) as info:
        await audited.completions.create(**args, extra_headers={"x-meshd-receipt": "maybe"})
    assert info.value.code == "invalid_receipt_header"
    async with aiohttp.ClientSession() as s, s.get(mesh["url"] + "/metrics") as r:
        metrics = await r.text()
    assert 'meshd_receipts_total{outcome="issued"} 1.0' in metrics  # the one asked for
    assert mesh["rt"].receipts.describe()["issued"] == 1


async def test_a_revoked_nodes_receipts_after_revocation_do_not_verify(
        mesh: dict[str, Any]) -> None:
    c = client(mesh)
    args: dict[str, Any] = {"model": "meshd-tiny", "prompt": PROMPT, "max_tokens": 4,
                            "temperature": 0}
    before = await c.completions.create(**args)
    mesh["store"].revoke_key(mesh["nodes"]["d0"])
    # the registry stops routing to a revoked node; this test's membership is fixed, so the
    # node still serves, and what it signs now must not verify
    after = await c.completions.create(**args)
    doc = await published(mesh)
    (row,) = [n for n in doc["nodes"] if n["node_id"] == mesh["nodes"]["d0"]]
    assert row["state"] == "revoked" and row["revoked_at_ms"] is not None
    keys = receipts.KeySet.from_json(doc)
    old = receipts.verify((before.model_extra or {})["meshd"]["receipt"], keys,
                          {0: before.choices[0].text})
    assert old.ok, old.problems  # made before the revocation
    new = receipts.verify((after.model_extra or {})["meshd"]["receipt"], keys,
                          {0: after.choices[0].text})
    assert any("signed after its key was revoked" in p for p in new.problems), new.problems


async def test_meshd_receipt_verify_checks_saved_responses(mesh: dict[str, Any]) -> None:
    tmp: Path = mesh["tmp"]
    keys_file = tmp / "keys.json"
    keys_file.write_text(json.dumps(await published(mesh)))
    headers = {"authorization": f"Bearer {KEYS['audited']}"}
    body = {"model": "meshd-tiny", "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 5, "temperature": 0}
    async with aiohttp.ClientSession() as s:
        async with s.post(mesh["url"] + "/v1/chat/completions", json=body,
                          headers=headers) as r:
            saved = await r.read()
        async with s.post(mesh["url"] + "/v1/chat/completions", json={**body, "stream": True},
                          headers=headers) as r:
            sse = await r.read()
    (tmp / "out.json").write_bytes(saved)
    (tmp / "out.sse").write_bytes(sse)
    doc = json.loads(saved)
    doc["choices"][0]["message"]["content"] += "!"
    (tmp / "tampered.json").write_text(json.dumps(doc))
    (tmp / "receipt.json").write_text(json.dumps(doc["meshd"]["receipt"]))
    verify = ["--config", "/dev/null", "receipt", "verify", "--keys", str(keys_file)]
    assert cli.main([*verify, str(tmp / "out.json")]) == 0
    assert cli.main([*verify, str(tmp / "out.sse")]) == 0
    assert cli.main([*verify, str(tmp / "receipt.json")]) == 0  # signatures only
    assert cli.main([*verify, str(tmp / "tampered.json")]) == 1
    assert cli.main([*verify, str(tmp / "nothing.json")]) == 1  # unreadable: said, not raised


async def test_a_receipt_of_many_choices_is_in_the_body_only(mesh: dict[str, Any]) -> None:
    """n choices, one receipt covering each; past 8 KB it leaves the header out (clients cap
    header blocks), the body still has it and it verifies."""
    c = client(mesh)
    raw = await c.completions.with_raw_response.create(
        model="meshd-tiny", prompt=PROMPT, max_tokens=2, n=12, temperature=1.0, seed=7)
    out = raw.parse()
    receipt = (out.model_extra or {})["meshd"]["receipt"]
    assert "x-meshd-receipt" not in raw.headers
    assert [ch["index"] for ch in receipt["choices"]] == list(range(12))
    keys = receipts.KeySet.from_json(await published(mesh))
    result = receipts.verify(receipt, keys, {ch.index: ch.text for ch in out.choices})
    assert result.ok, result.problems
