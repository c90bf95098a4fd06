"""The admission stage through the real gateway (HTTP, one replica, its in-process ledger):
tenants come from keys only, policy refusals, rate limits with their headers, settlement on
every ending, the loop breaker against a scripted looping client, policy reloads."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.fake import load_fake_backend
from support.net import free_port

from meshd.config import ConfigError, build, load
from meshd.coordinator.gateway.config import GatewayConfig
from meshd.coordinator.gateway.runtime import GatewayRuntime

ACME, BETA, ROOT = "sk-acme-0123456789", "sk-beta-0123456789", "sk-root-0123456789"


@contextlib.asynccontextmanager
async def make_gateway(governance: dict[str, Any], chunks: int = 3,
                       keys: bool = True) -> AsyncIterator[tuple[GatewayRuntime, Any, str]]:
    fake = load_fake_backend().FakeBackend(chunks=chunks)
    backend = await fake.start()
    cfg = build(GatewayConfig, {
        "port": free_port(), "static_workers": [f"http://127.0.0.1:{backend}"],
        "api_keys": {"acme": ACME, "beta": BETA, "root": ROOT} if keys else {},
        "governance": governance}, "gateway.")
    rt = GatewayRuntime(cfg)
    await rt.start()
    try:
        yield rt, fake, f"http://127.0.0.1:{cfg.port}"
    finally:
        await rt.stop(2)
        if fake.server is not None:
            fake.server.close()


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def complete(http: aiohttp.ClientSession, url: str, key: str, **body: Any
                   ) -> tuple[int, dict[str, str], Any]:
    payload = {"model": "fake", "prompt": "hello there", "max_tokens": 9, **body}
    async with http.post(f"{url}/v1/completions", json=payload, headers=auth(key)) as r:
        return r.status, dict(r.headers), await r.json()


async def test_the_tenant_is_the_keys_never_a_header() -> None:
    async with make_gateway({"tenants": {"acme": {"rpm": 100}, "root": {"admin": True}}}) as (
            rt, _, url), aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/completions", headers={
                **auth(ACME), "x-meshd-tenant": "beta", "openai-organization": "beta"},
                json={"model": "fake", "prompt": "x", "max_tokens": 9, "user": "beta"}) as r:
            assert r.status == 200
        async with http.get(f"{url}/v1/meshd/usage", headers=auth(ROOT)) as r:
            report = await r.json()
        assert set(report["totals"]) == {"acme"}
        assert rt.governor.metrics.outcomes == {("acme", "admitted"): 1}


async def test_policy_refusals_name_the_rule() -> None:
    policy = {"tenants": {"acme": {"models": ["other"], "rpm": 100},
                          "beta": {"max_tokens": 12, "rpm": 100}}}
    async with make_gateway(policy) as (_, fake, url), aiohttp.ClientSession() as http:
        status, _, body = await complete(http, url, ACME)
        assert status == 403 and body["error"]["code"] == "model_not_allowed"
        assert "'acme' may not use the model 'fake'" in body["error"]["message"]
        status, _, body = await complete(http, url, BETA, max_tokens=13)
        assert status == 400 and body["error"]["param"] == "max_tokens"
        assert "limit of 12" in body["error"]["message"]
        payload = {"model": "fake", "prompt": "no max_tokens"}
        async with http.post(f"{url}/v1/completions", json=payload, headers=auth(BETA)) as r:
            assert r.status == 200
        assert fake.last_body["max_tokens"] == 12  # the tenant's cap went to the worker
        async with http.post(f"{url}/v1/completions", json=payload, headers=auth(BETA)) as r:
            # reserved on what such requests produced (9 tokens, x1.5), capped at 12
            assert r.headers["x-meshd-completion-estimate"] == "running;tokens=12"


async def test_rate_limits_answer_429_with_openai_headers() -> None:
    async with make_gateway({"tenants": {"acme": {"rpm": 2, "tpm": 10_000}}}) as (
            rt, _, url), aiohttp.ClientSession() as http:
        status, hdrs, _ = await complete(http, url, ACME)
        assert status == 200
        assert hdrs["x-ratelimit-limit-requests"] == "2"
        assert hdrs["x-ratelimit-remaining-requests"] == "1"
        assert hdrs["x-ratelimit-limit-tokens"] == "10000"
        assert int(hdrs["x-ratelimit-reset-requests"].rstrip("s")) <= 60
        assert hdrs["x-meshd-completion-estimate"] == "max_tokens"
        assert (await complete(http, url, ACME))[0] == 200
        status, hdrs, body = await complete(http, url, ACME)
        assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
        assert "rpm limit of 2" in body["error"]["message"]
        assert 1 <= int(hdrs["Retry-After"]) <= 60
        assert hdrs["x-ratelimit-remaining-requests"] == "0"
        status, _, _ = await complete(http, url, BETA)  # another tenant is not limited
        assert status == 200
        assert rt.governor.metrics.outcomes[("acme", "rpm")] == 1


async def test_a_spend_budget_refuses_as_insufficient_quota() -> None:
    # 0.5 USD/M input, 1 USD/M output: a 9-token completion reserves ~1e-5 USD
    policy = {"tenants": {"acme": {"daily_budget_usd": 0.00003}},
              "prices": {"fake": {"input": 0.5, "cached_input": 0.05, "output": 1.0}}}
    async with make_gateway(policy) as (rt, _, url), aiohttp.ClientSession() as http:
        statuses = [(await complete(http, url, ACME))[0] for _ in range(5)]
        assert statuses[0] == 200 and statuses[-1] == 429
        status, _, body = await complete(http, url, ACME)
        assert status == 429 and body["error"]["code"] == "insufficient_quota"
        assert body["error"]["type"] == "insufficient_quota"
        assert "daily_budget_usd limit of $0.00" in body["error"]["message"]
        spent = rt.governor.metrics.spend["acme"]
        assert 0 < spent <= 30_000  # nano-USD, never past the budget


async def test_every_ending_settles_the_reservation() -> None:
    async with make_gateway({"tenants": {"acme": {"tpm": 100_000, "max_concurrent": 4}}},
                            chunks=40) as (rt, _, url), aiohttp.ClientSession() as http:
        gov = rt.governor
        # a stream read to the end
        payload = {"model": "fake", "prompt": "stream me", "max_tokens": 120, "stream": True}
        async with http.post(f"{url}/v1/completions", json=payload, headers=auth(ACME)) as r:
            assert r.status == 200
            await r.read()
        assert gov.outstanding == 0 and gov.book.inflight() == 0
        # a client that leaves mid-stream
        slow = {**payload, "fake_delay": 0.02}
        async with http.post(f"{url}/v1/completions", json=slow, headers=auth(ACME)) as r:
            await r.content.readline()
            assert gov.outstanding == 1 and gov.book.inflight() > 0
        for _ in range(100):
            if gov.outstanding == 0:
                break
            await asyncio.sleep(0.02)
        assert gov.outstanding == 0 and gov.book.inflight() == 0
        # a worker failure
        status, _, _ = await complete(http, url, ACME, fake_status=500)
        assert status >= 500
        assert gov.outstanding == 0 and gov.book.inflight() == 0
        tokens = gov.metrics.tokens
        assert 0 < tokens[("acme", "completion")] < 120 + 120  # the partial stream counted


async def test_the_loop_breaker_refuses_a_looping_agent() -> None:
    loops = {"max_repeats": 4, "window_s": 60, "action": "refuse", "tail_tokens": 16}
    async with make_gateway({"loops": loops}) as (rt, _, url), aiohttp.ClientSession() as http:
        history = "You are an agent. Tool says: file not found. "
        statuses = []
        for turn in range(6):  # the same tool result, again and again
            prompt = f"step {turn} " * 3 + history + "Call the tool again."
            status, hdrs, body = await complete(http, url, ACME, prompt=prompt, user="bot-7")
            statuses.append(status)
        assert statuses == [200, 200, 200, 429, 429, 429]
        assert body["error"]["code"] == "loop_detected"
        assert "repeat_prompt" in body["error"]["message"] and "acme/bot-7" in body[
            "error"]["message"]
        assert hdrs["Retry-After"] == "60"
        # the same tenant's other user, in a normal growing conversation (its answers differ:
        # the fake worker's length varies), is untouched
        chat = ""
        for turn in range(8):
            chat += f"user asks question number {turn} about topic {turn * 7}. "
            status, _, _ = await complete(http, url, ACME, prompt=chat, user="human",
                                          fake_chunks=turn + 1, max_tokens=30)
            assert status == 200
        assert rt.governor.metrics.loops == {("acme", "repeat_prompt", "refuse"): 3}


async def test_identical_answers_to_growing_prompts_trip_repeat_output() -> None:
    loops = {"max_output_repeats": 3, "action": "refuse"}
    async with make_gateway({"loops": loops}) as (_, _, url), aiohttp.ClientSession() as http:
        chat, statuses = "", []
        for turn in range(5):  # the prompt grows, the answer is the same every time
            chat += f"observation {turn} differs from the one before. "
            status, _, body = await complete(http, url, ACME, prompt=chat)
            statuses.append(status)
        assert statuses == [200, 200, 200, 429, 429]
        assert "repeat_output" in body["error"]["message"]


async def test_slow_action_delays_instead_of_refusing() -> None:
    loops = {"max_repeats": 2, "action": "slow", "slow_s": 0.3, "tail_tokens": 8}
    async with make_gateway({"loops": loops}) as (_, _, url), aiohttp.ClientSession() as http:
        loop = asyncio.get_running_loop()
        await complete(http, url, ACME, prompt="again and again")
        t0 = loop.time()
        status, _, _ = await complete(http, url, ACME, prompt="again and again")
        assert status == 200 and loop.time() - t0 >= 0.3


async def test_the_policy_file_reloads_without_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[tenants.acme]\nrpm = 1\n')
    gov = {"policy_file": str(path), "reload_interval_s": 0.05}
    async with make_gateway(gov) as (rt, _, url), aiohttp.ClientSession() as http:
        assert (await complete(http, url, ACME))[0] == 200
        assert (await complete(http, url, ACME))[0] == 429
        path.write_text('[tenants.acme]\nrpm = 100\n[tenants.gamma]\n'
                        'api_keys = ["sk-gamma-0123456789"]\n')
        await wait_for(lambda: rt.policy.reloads == 1)
        assert (await complete(http, url, ACME))[0] == 200
        assert (await complete(http, url, "sk-gamma-0123456789"))[0] == 200  # a new key
        path.write_text('[tenants.acme]\nrpm = "many"\n')  # a bad edit: the policy stays
        await wait_for(lambda: rt.governor.metrics.reload_errors == 1)
        assert "tenants.acme.rpm" in rt.policy.last_error
        assert (await complete(http, url, "sk-gamma-0123456789"))[0] == 200


async def wait_for(cond: Any, timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_usage_is_the_tenants_own_unless_admin() -> None:
    policy = {"tenants": {"root": {"admin": True}}}
    async with make_gateway(policy) as (_, _, url), aiohttp.ClientSession() as http:
        for key in (ACME, BETA):
            assert (await complete(http, url, key))[0] == 200
        async with http.get(f"{url}/v1/meshd/usage", headers=auth(ACME)) as r:
            assert set((await r.json())["totals"]) == {"acme"}
        async with http.get(f"{url}/v1/meshd/usage?tenant=beta", headers=auth(ACME)) as r:
            assert r.status == 403
            assert (await r.json())["error"]["code"] == "permission_denied"
        async with http.get(f"{url}/v1/meshd/usage?tenant=beta", headers=auth(ROOT)) as r:
            assert set((await r.json())["totals"]) == {"beta"}
        async with http.get(f"{url}/v1/meshd/usage", headers=auth(ROOT)) as r:
            assert set((await r.json())["totals"]) == {"acme", "beta"}
        async with http.get(f"{url}/v1/meshd/usage?since=yesterday", headers=auth(ROOT)) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "since"
        async with http.get(f"{url}/v1/meshd/usage") as r:
            assert r.status == 401


async def test_without_keys_the_default_tenant_is_governed() -> None:
    policy = {"default_tenant": "local", "defaults": {"rpm": 1}}
    async with make_gateway(policy, keys=False) as (rt, _, url), aiohttp.ClientSession() as http:
        assert (await complete(http, url, "anything"))[0] == 200
        assert (await complete(http, url, "anything"))[0] == 429
        assert rt.governor.metrics.outcomes[("local", "rpm")] == 1


@pytest.mark.parametrize(("toml", "message"), [
    ('[gateway.governance.tenants.acme]\nrpm = -1\n',
     "gateway.governance.tenants.acme.rpm: must be >= 0"),
    ('[gateway.governance.tenants.acme]\nbudget = 3\n',
     "gateway.governance.tenants.acme.budget: unknown field"),
    ('[gateway.governance.tenants.acme]\npriority = "urgent"\n',
     "gateway.governance.tenants.acme.priority: must be one of high, normal, low"),
    ('[gateway.governance.prices.tiny]\ninput = "cheap"\n',
     "gateway.governance.prices.tiny.input: expected a number"),
    ('[gateway.governance.tenants."a/b"]\nrpm = 1\n', "gateway.governance.tenants.a/b"),
    ('[gateway.governance.ledger]\nfail_mode = "maybe"\n',
     "gateway.governance.ledger.fail_mode: must be closed or open"),
    ('[gateway.governance]\npolicy_file = "/nonexistent/policy.toml"\n',
     "gateway.governance.policy_file: cannot read /nonexistent/policy.toml"),
])
def test_a_malformed_policy_stops_start_up_naming_the_field(tmp_path: Path, toml: str,
                                                            message: str) -> None:
    path = tmp_path / "meshd.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load(path, environ={})
    assert message in str(e.value)


def test_a_malformed_policy_file_names_the_file_and_field(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[tenants.acme]\ntpm = "lots"\n')
    path = tmp_path / "meshd.toml"
    path.write_text(f'[gateway.governance]\npolicy_file = "{policy}"\n')
    with pytest.raises(ConfigError) as e:
        load(path, environ={})
    assert f"{policy}: tenants.acme.tpm: expected an integer" in str(e.value)


async def test_pass_through_requests_are_governed_on_an_estimate() -> None:
    fake = load_fake_backend().FakeBackend(chunks=3)
    backend = await fake.start()
    cfg = build(GatewayConfig, {
        "port": free_port(), "static_workers": [f"openai=http://127.0.0.1:{backend}"],
        "api_keys": {"acme": ACME},
        "governance": {"tenants": {"acme": {"rpm": 2, "tpm": 10_000}}}}, "gateway.")
    rt = GatewayRuntime(cfg)
    await rt.start()
    url = f"http://127.0.0.1:{cfg.port}"
    try:
        async with aiohttp.ClientSession() as http:
            statuses = [(await complete(http, url, ACME, prompt="x" * 400))[0]
                        for _ in range(3)]
            assert statuses == [200, 200, 429]
        gov = rt.governor
        assert gov.outstanding == 0 and gov.book.inflight() == 0
        # the prompt is reserved at ~4 bytes a token (the body is a little over 400 bytes),
        # and settled as reserved: the worker tokenized it, not the gateway
        prompt = gov.metrics.tokens[("acme", "prompt")]
        assert 2 * 100 <= prompt <= 2 * 125
        assert gov.metrics.tokens[("acme", "completion")] == 2 * 9
    finally:
        await rt.stop(2)
        if fake.server is not None:
            fake.server.close()

