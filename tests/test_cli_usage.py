"""`meshd usage` against a real in-process gateway with a tenant policy (an admin tenant, a
limited one, a price table) and the fake worker; the usage and `meshd status` governance
tables from dicts; the `MESHD_API_KEY` accessor."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.control import control_server, make_config
from support.fake import load_fake_backend
from support.net import free_port

from meshd import cli, config, env
from meshd.commands import gateway_get
from meshd.commands.status import governance_section, requests_section
from meshd.commands.usage import limits_table, usage_table
from meshd.coordinator.actors import ensure_admin_key
from meshd.coordinator.gateway.config import GatewayConfig
from meshd.coordinator.gateway.runtime import GatewayRuntime

OPS, ACME = "sk-ops-0123456789", "sk-acme-0123456789"
PRICE = {"input": 1.0, "cached_input": 0.1, "output": 2.0}  # USD per 1M tokens
COMPLETION = 9  # the fake worker's 3 chunks of 3 token ids each


def make_gateway_config(port: int, backend: int) -> GatewayConfig:
    return config.build(GatewayConfig, {
        "port": port, "static_workers": [f"http://127.0.0.1:{backend}"],
        "governance": {"tenants": {"ops": {"admin": True, "api_keys": [OPS]},
                                   "acme": {"api_keys": [ACME], "daily_tokens": 1000,
                                            "max_tokens": 16}},
                       "prices": {"fake": PRICE},
                       "ledger": {"sync_interval_s": 0.2, "lease_ttl_s": 5.0}}}, "gateway.")


@contextlib.asynccontextmanager
async def make_gateway() -> AsyncIterator[GatewayRuntime]:
    """A gateway that served acme twice (and refused it once: max_tokens past its cap) and ops
    once."""
    fake = load_fake_backend().FakeBackend(chunks=3)
    rt = GatewayRuntime(make_gateway_config(free_port(), await fake.start()))
    await rt.start()
    try:
        async with aiohttp.ClientSession() as http:
            for key, prompt, max_tokens, want in ((ACME, "hello world", COMPLETION, 200),
                                                  (ACME, "x y z", COMPLETION, 200),
                                                  (ACME, "too long", 99, 400),
                                                  (OPS, "hi", COMPLETION, 200)):
                async with http.post(f"http://127.0.0.1:{rt.config.port}/v1/completions",
                                     json={"model": "fake", "prompt": prompt,
                                           "max_tokens": max_tokens},
                                     headers={"authorization": f"Bearer {key}"}) as r:
                    assert r.status == want, await r.text()
        yield rt
    finally:
        await rt.stop(2)
        if fake.server is not None:
            fake.server.close()


def make_config_file(tmp_path: Path, port: int) -> str:
    path = tmp_path / "meshd.toml"
    path.write_text(f"[gateway]\nport = {port}\n")
    return str(path)


async def meshd(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`meshd ARGV` in a thread (the gateway runs on this loop): (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def expected_row(rt: GatewayRuntime, tenant: str, model: str, requests: int,
                 refused: int) -> list[str]:
    """What the table must say of `tenant`: the tokens this replica counted (the only one
    serving), priced by PRICE, no prefix-cache hits (the fake worker reports none)."""
    tokens = rt.governor.metrics.tokens
    prompt, completion = tokens[(tenant, "prompt")], tokens[(tenant, "completion")]
    assert prompt > 0 and completion == requests * COMPLETION
    spend = (prompt * PRICE["input"] + completion * PRICE["output"]) / 1e6
    assert rt.governor.metrics.spend[tenant] == round(spend * 1e9)
    return [tenant, model, str(requests), str(prompt), "0", str(completion), f"{spend:.6f}",
            "0.000000", str(refused)]


def rows(out: str) -> dict[tuple[str, str], list[str]]:
    """The usage table's rows by (tenant, model)."""
    lines = out.splitlines()
    head = next(i for i, li in enumerate(lines) if li.split()[:2] == ["TENANT", "MODEL"])
    table = [li.split() for li in lines[head + 1:lines.index("", head)]]
    return {(r[0], r[1]): r for r in table}


async def test_admin_sees_every_tenant_and_a_tenant_only_itself(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with make_gateway() as rt:
        port, cfg = rt.config.port, make_config_file(tmp_path, rt.config.port)
        today = time.strftime("%Y-%m-%d", time.gmtime())
        code, out, err = await meshd(capsys, "--config", cfg, "usage", "--api-key", OPS)
        assert code == 0, err
        assert out.splitlines()[0] == (f"usage {today[:8]}01 .. {today}, all tenants "
                                       f"(gateway 127.0.0.1:{port}):")
        acme = expected_row(rt, "acme", "fake", 2, 1)
        ops = expected_row(rt, "ops", "fake", 1, 0)
        assert rows(out) == {("acme", "fake"): acme, ("acme", "(total)"): [*acme[:1], "(total)",
                                                                          *acme[2:]],
                             ("ops", "fake"): ops, ("ops", "(total)"): [*ops[:1], "(total)",
                                                                       *ops[2:]]}
        limits = out.splitlines()[out.splitlines().index("limits (current windows):") + 1:]
        assert limits[0].split() == ["OWNER", "LIMIT", "WINDOW", "USED/MAX", "RESERVED", "UNIT"]
        used = int(acme[3]) + int(acme[5])
        row = limits[1].split()
        assert row[:4] == ["acme", "daily_tokens", today, f"{used}/1000"] and row[5] == "tokens"
        assert len(limits) == 2  # ops has no limits

        code, out, err = await meshd(capsys, "--config", cfg, "usage", "--api-key", ACME,
                                     "--since", today, "--until", today)
        assert code == 0, err
        assert out.splitlines()[0] == (f"usage {today} .. {today}, tenant acme "
                                       f"(gateway 127.0.0.1:{port}):")
        assert set(rows(out)) == {("acme", "fake"), ("acme", "(total)")}
        assert rows(out)[("acme", "fake")] == acme

        code, out, err = await meshd(capsys, "--config", cfg, "usage", "--api-key", ACME,
                                     "--tenant", "ops")
        assert (code, out) == (1, "")
        assert err == (f"meshd: gateway 127.0.0.1:{port}: HTTP 403: Tenant 'acme' may read "
                       "its own usage only.\n")

        code, out, err = await meshd(capsys, "--config", cfg, "usage", "--api-key", OPS,
                                     "--since", "2000-01-01", "--until", "2000-01-31")
        assert code == 0, err
        assert out.splitlines()[1] == "  (no usage in this range)"


async def test_api_key_errors_and_the_environment_variable(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    async with make_gateway() as rt:
        port, cfg = rt.config.port, make_config_file(tmp_path, rt.config.port)
        where = f"meshd: gateway 127.0.0.1:{port}"
        monkeypatch.delenv(env.API_KEY_VAR, raising=False)
        cases = [
            (("--api-key", "sk-wrong-0123456789"), f"{where} refused the API key (HTTP 401); "
             "pass --api-key or set MESHD_API_KEY\n"),
            ((), f"{where} needs an API key (HTTP 401); pass --api-key or set MESHD_API_KEY\n"),
            (("--api-key", OPS, "--since", "2000-1-1"), f"{where}: HTTP 400: 'since' must be a "
             "UTC date YYYY-MM-DD, got '2000-1-1'.\n"),
        ]
        for flags, want in cases:
            code, out, err = await meshd(capsys, "--config", cfg, "usage", *flags)
            assert (code, out, err) == (1, "", want), flags

        monkeypatch.setenv(env.API_KEY_VAR, ACME)
        code, out, err = await meshd(capsys, "--config", cfg, "usage")
        assert code == 0, err
        assert "tenant acme" in out.splitlines()[0]
        code, out, err = await meshd(capsys, "--config", cfg, "usage", "--api-key", OPS)
        assert code == 0 and "all tenants" in out.splitlines()[0]  # the flag wins


async def test_json_is_the_gateways_answer(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    async with make_gateway() as rt:
        cfg = make_config_file(tmp_path, rt.config.port)
        code, out, err = await meshd(capsys, "--config", cfg, "usage", "--api-key", OPS,
                                     "--json")
        assert code == 0, err
        direct = await asyncio.to_thread(gateway_get, "127.0.0.1", rt.config.port,
                                         "/v1/meshd/usage", {"Authorization": f"Bearer {OPS}"})
        assert direct.status == 200
        assert json.loads(out) == direct.body
        assert set(direct.body["totals"]) == {"acme", "ops"}


async def test_no_gateway_is_a_clear_error(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    down = free_port()
    code, out, err = await meshd(capsys, "--config", make_config_file(tmp_path, down), "usage",
                                 "--api-key", OPS)
    assert (code, out) == (1, "")
    assert err.startswith(f"meshd: gateway 127.0.0.1:{down} is unreachable (")
    assert err.endswith("start it, or point gateway.host and gateway.port (MESHD_GATEWAY_HOST, "
                        "MESHD_GATEWAY_PORT) at it\n")

    fake = load_fake_backend().FakeBackend()  # answers every GET with a model list
    port = await fake.start()
    try:
        code, out, err = await meshd(capsys, "--config", make_config_file(tmp_path, port),
                                     "usage")
        assert (code, err) == (1, f"meshd: gateway 127.0.0.1:{port}: unexpected answer to GET "
                                  "/v1/meshd/usage (not a meshd.usage report)\n")
    finally:
        assert fake.server is not None
        fake.server.close()


async def test_status_shows_the_governance_section(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    async with control_server(make_config(tmp_path / "coord")) as run, make_gateway() as rt:
        ensure_admin_key(str(tmp_path / "coord"), run.store)
        port = rt.config.port
        argv = ("--config", make_config_file(tmp_path, port), "status", "--state-dir",
                str(tmp_path / "coord"), "--coordinator", run.address)
        code, out, err = await meshd(capsys, *argv)
        assert code == 0, err
        lines = out.splitlines()
        head = lines.index(f"governance (gateway 127.0.0.1:{port}):")
        assert lines.index(f"cache routing (gateway 127.0.0.1:{port}): ok") < head
        assert [li.split() for li in lines[head + 1:head + 4]] == [
            ["TENANT", "ADMITTED", "REFUSED"], ["acme", "2", "max_tokens", "x1"],
            ["ops", "1", "-"]]

        code, out, err = await meshd(capsys, *argv, "--json")
        assert code == 0, err
        gov = json.loads(out)["governance"]
        assert gov["reachable"] is True and gov["gateway"] == f"127.0.0.1:{port}"
        assert gov["tenants"] == {"acme": {"admitted": 2, "max_tokens": 1},
                                  "ops": {"admitted": 1}}
        assert gov["outstanding"] == 0 and gov["ledger"]["leases_valid"] is True


REPORT: dict[str, Any] = {
    "tenant": None, "since": "2026-03-01", "until": "2026-03-02",
    "data": [
        {"day": "2026-03-01", "tenant": "acme", "model": "tiny", "requests": 3,
         "prompt_tokens": 300, "cached_tokens": 200, "completion_tokens": 60, "refused": 1,
         "spend_usd": 0.00025, "cached_savings_usd": 0.00009},
        {"day": "2026-03-02", "tenant": "acme", "model": "tiny", "requests": 1,
         "prompt_tokens": 100, "cached_tokens": 0, "completion_tokens": 20, "refused": 0,
         "spend_usd": 0.00008, "cached_savings_usd": 0.0},
        {"day": "2026-03-02", "tenant": "acme", "model": "big", "requests": 1,
         "prompt_tokens": 10, "cached_tokens": 0, "completion_tokens": 5, "refused": 2,
         "spend_usd": 1.5, "cached_savings_usd": 0.0}],
    "totals": {"acme": {"requests": 5, "prompt_tokens": 410, "cached_tokens": 200,
                        "completion_tokens": 85, "refused": 3, "spend_usd": 1.50033,
                        "cached_savings_usd": 0.00009}}}


def test_usage_table_sums_days_per_model() -> None:
    assert usage_table("gw:1", REPORT).splitlines() == [
        "usage 2026-03-01 .. 2026-03-02, all tenants (gateway gw:1):",
        "  TENANT  MODEL    REQUESTS  PROMPT  CACHED  COMPLETION   SPEND $   SAVED $  REFUSED",
        "  acme    big             1      10       0           5  1.500000  0.000000        2",
        "  acme    tiny            4     400     200          80  0.000330  0.000090        1",
        "  acme    (total)         5     410     200          85  1.500330  0.000090        3"]
    empty = {"tenant": "acme", "since": "2026-03-01", "until": "2026-03-02", "data": [],
             "totals": {}}
    assert usage_table("gw:1", empty).splitlines() == [
        "usage 2026-03-01 .. 2026-03-02, tenant acme (gateway gw:1):",
        "  (no usage in this range)"]


@pytest.mark.parametrize(("limits", "want"), [
    ({}, ["limits: none set"]),
    ({"fleet": [{"limit": "fleet_spend_per_hour", "window": "493", "max": 50.0, "used": 1.25,
                 "reserved": 0.5, "unit": "usd"}],
      "acme": [{"limit": "tpm", "window": "29937290", "max": 100000.0, "used": 120.0,
                "reserved": 10000.0, "unit": "tokens"},
               {"limit": "max_concurrent", "window": None, "max": 4.0, "used": 1.0,
                "reserved": 0.0, "unit": "requests"}]},
     ["limits (current windows):",
      "  OWNER  LIMIT                 WINDOW      USED/MAX  RESERVED  UNIT",
      "  acme   max_concurrent        -                1/4         0  requests",
      "  acme   tpm                   29937290  120/100000     10000  tokens",
      "  fleet  fleet_spend_per_hour  493          1.25/50       0.5  usd"]),
])
def test_limits_table(limits: dict[str, Any], want: list[str]) -> None:
    assert limits_table(limits).splitlines() == want


def make_governance(**over: Any) -> dict[str, Any]:
    report: dict[str, Any] = {
        "tenants": {}, "outstanding": 0, "reserved_units": 0,
        "fair": {"max_active": 0, "active": 0, "queued": 0},
        "ledger": {"replica": "h/0/1.0", "epoch": 1, "leases_valid": True, "syncs": 4,
                   "failures": 0, "last_error": "", "meters": 0, "resets": 0,
                   "fail_mode": "closed"},
        "policy": {"tenants": [], "default_tenant": "default", "priced_models": []}}
    return report | over


@pytest.mark.parametrize(("report", "why", "want"), [
    (None, "[Errno 111] Connection refused",
     ["governance: gateway gw:1 unreachable ([Errno 111] Connection refused)"]),
    (make_governance(), "",
     ["governance (gateway gw:1):",
      "  TENANT ADMITTED  REFUSED",
      "  (no requests yet)",
      "  reservations outstanding: 0 (0 units)",
      "  fair queue: off (fair.max_active = 0)",
      "  ledger: epoch 1, leases valid, syncs 4, failures 0, last error: - (fail closed)"]),
    (make_governance(
        tenants={"other": {"rpm": 2}, "acme-corp": {"admitted": 7, "rpm": 1,
                                                    "insufficient_quota": 3}},
        outstanding=2, reserved_units=640, fair={"max_active": 8, "active": 8, "queued": 5},
        ledger={"epoch": 3, "leases_valid": False, "syncs": 9, "failures": 2,
                "last_error": "ledger timed out", "fail_mode": "open"},
        cost_us={"admit": 12.5, "settle": 7.25, "samples": 40, "every": 16}), "",
     ["governance (gateway gw:1):",
      "  TENANT    ADMITTED  REFUSED",
      "  acme-corp        7  insufficient_quota x3, rpm x1",
      "  other            0  rpm x2",
      "  reservations outstanding: 2 (640 units)",
      "  fair queue: 8/8 active, 5 queued",
      "  ledger: epoch 3, leases EXPIRED, syncs 9, failures 2, last error: ledger timed out "
      "(fail open)",
      "  admission cost: 12.5 us + settlement 7.25 us of CPU per request (40 sampled)"]),
])
def test_governance_section(report: dict[str, Any] | None, why: str, want: list[str]) -> None:
    assert governance_section("gw:1", report, why).splitlines() == want


def test_requests_section() -> None:
    """`meshd status`'s request records: hourly rollups summed per tenant and model."""
    hour = {"tenant": "acme", "model": "m", "requests": 3, "errors": 1, "prompt_tokens": 300,
            "completion_tokens": 30, "ttft_count": 2, "ttft_sum_s": 0.1, "ttft_max_s": 0.07}
    report = {"rollups": [hour, {**hour, "requests": 1, "errors": 0, "ttft_max_s": 0.09},
                          {**hour, "tenant": "", "model": "m2", "ttft_count": 0}]}
    assert requests_section("gw:1", report, "").splitlines() == [
        "requests (gateway gw:1, last 24 h, this replica):",
        "  TENANT MODEL REQUESTS ERRORS   PROMPT COMPLETION  TTFT MEAN  TTFT MAX",
        "  -      m2           3      1      300         30          -         -",
        "  acme   m            4      1      600         60      50 ms     90 ms"]
    assert requests_section("gw:1", {"rollups": []}, "").splitlines()[1] == \
        "  (no requests recorded)"
    assert requests_section("gw:1", None, "HTTP 404: no records") == \
        "requests: gateway gw:1: HTTP 404: no records"


@pytest.mark.parametrize(("environ", "want"), [
    ({}, None), ({"MESHD_API_KEY": ""}, None), ({"MESHD_API_KEY": "sk-x-12345678"},
                                                "sk-x-12345678")])
def test_api_key_from_the_environment(environ: dict[str, str], want: str | None) -> None:
    assert env.api_key(environ) == want
    assert env.unknown(config.sections(), environ) == []  # not a typo of a config field
