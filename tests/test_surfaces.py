"""Open surfaces (`meshd/surfaces.py`): each config gives exactly the warnings it should, each
naming the field (and `MESHD_*` variable) that closes it; the defaults leave only the gateway's
missing API keys."""

from __future__ import annotations

import io
import logging

import pytest

from meshd import surfaces
from meshd.config import load

# A distinctive fragment of each warning, and the setting it names to close the surface.
KINDS = {
    "ray_auth": ("Ray token auth is off", "[ray] auth_mode = 'token' (MESHD_RAY_AUTH_MODE=token)"),
    "ray_auth_join": ("meshd joins the Ray cluster at",
                      "[ray] auth_mode = 'token' (MESHD_RAY_AUTH_MODE=token)"),
    "dashboard_open": ("the Ray dashboard and its Jobs API listen on",
                       "[ray] dashboard_host = '127.0.0.1' (MESHD_RAY_DASHBOARD_HOST=127.0.0.1)"),
    "ray_ports": ("Ray's own ports",
                  "[ray] bind_host = '127.0.0.1' (MESHD_RAY_BIND_HOST=127.0.0.1)"),
    "gateway_local": ("has no API keys: any user or process on this host",
                      "[gateway] api_keys = { tenant = \"key\" } "
                      "(MESHD_GATEWAY_API_KEYS=tenant=key)"),
    "gateway_network": ("the OpenAI gateway is open to the network",
                        "[gateway] host = '127.0.0.1' (MESHD_GATEWAY_HOST=127.0.0.1)"),
}
KEYS = {"MESHD_GATEWAY_API_KEYS": "team=0123456789abcdef"}
OPEN_RAY = {"MESHD_RAY_AUTH_MODE": "disabled", "MESHD_RAY_DASHBOARD_HOST": "0.0.0.0",
            "MESHD_RAY_BIND_HOST": "0.0.0.0"}

CASES = [
    ("defaults", {}, ["gateway_local"]),
    ("defaults with api keys", KEYS, []),
    ("no gateway replicas", {"MESHD_GATEWAY_REPLICAS": "0"}, []),
    ("ray auth disabled", {**KEYS, "MESHD_RAY_AUTH_MODE": "disabled"}, ["ray_auth"]),
    ("dashboard on every interface", {**KEYS, "MESHD_RAY_DASHBOARD_HOST": "0.0.0.0"},
     ["dashboard_open"]),
    ("dashboard on an address, no auth", {**KEYS, "MESHD_RAY_DASHBOARD_HOST": "10.0.0.10",
                                          "MESHD_RAY_AUTH_MODE": "disabled"},
     ["ray_auth", "dashboard_open"]),
    ("dashboard off", {**KEYS, "MESHD_RAY_DASHBOARD_HOST": "0.0.0.0",
                       "MESHD_RAY_INCLUDE_DASHBOARD": "false"}, []),
    ("ray ports on an address", {**KEYS, "MESHD_RAY_BIND_HOST": "10.0.0.10"}, ["ray_ports"]),
    ("ray ports on ::1", {**KEYS, "MESHD_RAY_BIND_HOST": "::1"}, []),
    ("everything open", {**OPEN_RAY, "MESHD_GATEWAY_HOST": "0.0.0.0"},
     ["ray_auth", "dashboard_open", "ray_ports", "gateway_network"]),
    ("gateway on the network with keys", {**KEYS, "MESHD_GATEWAY_HOST": "0.0.0.0"}, []),
    ("gateway on an address without keys", {"MESHD_GATEWAY_HOST": "10.0.0.10"},
     ["gateway_network"]),
    # joining a cluster: its dashboard and ports are not meshd's to report
    ("joined cluster, no auth", {**KEYS, **OPEN_RAY, "MESHD_RAY_ADDRESS": "10.0.0.10:6379"},
     ["ray_auth_join"]),
    ("joined cluster, token", {**KEYS, "MESHD_RAY_ADDRESS": "auto",
                               "MESHD_RAY_BIND_HOST": "0.0.0.0"}, []),
]


@pytest.mark.parametrize(("environ", "kinds"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_open_surfaces(environ: dict[str, str], kinds: list[str]) -> None:
    found = surfaces.open_surfaces(load(environ=environ))
    assert len(found) == len(kinds), found
    for msg, kind in zip(found, kinds, strict=True):
        fragment, fix = KINDS[kind]
        assert fragment in msg and fix in msg, (kind, msg)


def test_default_config_warns_only_about_the_gateway_keys() -> None:
    assert surfaces.open_surfaces(load(environ={})) == [
        "the OpenAI gateway at http://127.0.0.1:8000 has no API keys: any user or process on "
        "this host can use the mesh and spend its budget (it listens on loopback only); set "
        "[gateway] api_keys = { tenant = \"key\" } (MESHD_GATEWAY_API_KEYS=tenant=key)"]


def test_the_open_cases_say_what_is_at_stake() -> None:
    msgs = surfaces.open_surfaces(load(environ={**OPEN_RAY, "MESHD_GATEWAY_HOST": "0.0.0.0"}))
    auth, dashboard, ports, gateway = msgs
    assert "run any command on this host" in auth
    assert "every interface (port 8265) with no auth" in dashboard
    assert "runs shell commands" in dashboard
    assert "ray.bind_host = '0.0.0.0'" in ports and "can run code" in ports
    assert "every interface (port 8000) with no API keys" in gateway
    assert "spend its budget" in gateway
    token = surfaces.open_surfaces(load(environ={**KEYS, "MESHD_RAY_DASHBOARD_HOST": "::"}))
    assert token == [surfaces.open_surfaces(load(environ={
        **KEYS, "MESHD_RAY_DASHBOARD_HOST": "0.0.0.0"}))[0].replace("'0.0.0.0'", "'::'")]
    assert "needs the Ray token" in token[0] and "no auth" not in token[0]


def test_announce_prints_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    out = io.StringIO()
    with caplog.at_level(logging.WARNING, logger="meshd.surfaces"):
        found = surfaces.announce(load(environ={}), out)
    assert out.getvalue() == f"warning: {found[0]}\n"
    assert [r.getMessage() for r in caplog.records] == [f"open surface: {found[0]}"]
