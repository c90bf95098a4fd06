"""Disaggregated prefill/decode between real engine processes over loopback (tcp and shm).

Prefill A (tcp), prefill A' (shm) and decode B share a mesh secret; every test compares B's
greedy tokens with one engine doing the whole request. Faulty transfers (corrupted, cut,
unauthenticated, unknown request) must fall back to local prefill with identical tokens.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from meshd.kv_transfer.auth import Ed25519Authenticator, SharedSecretAuthenticator
from meshd.kv_transfer.layout import BlockLayout
from meshd.kv_transfer.testing import DictSource, make_kv
from meshd.kv_transfer.transport import make_server as make_kv_server

from .server_helpers import (
    SECRET,
    SMALL,
    FaultProxy,
    ServerProc,
    http,
    make_prompt,
    make_server,
    metrics,
    wait_for,
)

MODEL = "meshd-tiny"
PROMPT_LEN = 40  # 2 full blocks of 16 to import, the rest computed on decode
MAX_TOKENS = 10
LAYOUT = BlockLayout(num_layers=4, num_kv_heads=4, head_dim=32, dtype="float32", block_size=16)
KV_ARGS = ("--kv-secret", SECRET, *SMALL)


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, ServerProc]]:
    procs: dict[str, ServerProc] = {}
    try:
        procs["tcp"] = make_server("--role", "prefill", "--kv-transfer", "tcp", *KV_ARGS)
        procs["shm"] = make_server("--role", "prefill", "--kv-transfer", "shm", *KV_ARGS)
        procs["auto"] = make_server("--role", "prefill", "--kv-transfer", "auto", *KV_ARGS)
        procs["decode"] = make_server("--role", "decode", "--pull-timeout-s", "5", *KV_ARGS)
        yield procs
    finally:
        codes = {k: p.stop() for k, p in procs.items()}
        assert all(c == 0 for c in codes.values()), codes


def body(prompt: list[int], **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, **kw}


def post(srv: ServerProc, payload: dict[str, Any], rid: str = "r") -> dict[str, Any]:
    status, out, _ = http(srv.url + "/v1/completions", payload, headers={"X-Request-Id": rid})
    assert status == 200, out
    return out  # type: ignore[no-any-return]


def prefill(srv: ServerProc, prompt: list[int], rid: str) -> dict[str, Any]:
    """What the proxy sends to P: max_tokens 1, stream off, do_remote_decode."""
    kvp = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
           "remote_block_ids": None, "remote_host": None, "remote_port": None}
    out = post(srv, body(prompt, max_tokens=1, kv_transfer_params=kvp), rid)
    params = out["kv_transfer_params"]
    assert params is not None and params["do_remote_prefill"] is True
    return params  # type: ignore[no-any-return]


def decode(srv: ServerProc, prompt: list[int], params: dict[str, Any], rid: str
           ) -> tuple[list[int], bool, int]:
    out = post(srv, body(prompt, kv_transfer_params=params), rid)
    c = out["choices"][0]
    return c["token_ids"], out["meshd"]["kv_pulled"], out["usage"]["prompt_tokens_details"][
        "cached_tokens"]


def reference(srv: ServerProc, prompt: list[int]) -> list[int]:
    return post(srv, body(prompt))["choices"][0]["token_ids"]  # type: ignore[no-any-return]


def test_auto_prefill_offers_both_and_same_host_decode_picks_shm(
        servers: dict[str, ServerProc]) -> None:
    """A prefill server with `--kv-transfer auto` serves tcp and shm on one port and sends its
    host facts; the decode server on the same host pulls over shm; a decode peer that only
    speaks tcp still gets the blocks from the same port."""
    p, d = servers["auto"], servers["decode"]
    prompt = make_prompt(PROMPT_LEN, salt=77)
    params = prefill(p, prompt, "auto-1")
    assert params["meshd_transport"] == "tcp" and params["meshd_transports"] == ["tcp", "shm"]
    assert params["meshd_host"]["hostname"] and params["meshd_host"]["gpus"] is False
    shm_pulls = 'meshd_engine_kv_transfer_pulls_by_transport_total{transport="shm"}'
    before = metrics(d.url).get(shm_pulls, 0.0)
    tokens, pulled, _ = decode(d, prompt, params, "auto-1")
    assert pulled and tokens == reference(p, prompt)
    m = metrics(d.url)
    assert m[shm_pulls] == before + 1
    # Another host (its facts say so) picks tcp from the same port.
    elsewhere = {**params, "meshd_host": {**params["meshd_host"], "hostname": "other-host"}}
    prompt2 = make_prompt(PROMPT_LEN, salt=78)
    params2 = {**prefill(p, prompt2, "auto-2"), "meshd_host": elsewhere["meshd_host"]}
    tokens, pulled, _ = decode(d, prompt2, params2, "auto-2")
    assert pulled and tokens == reference(p, prompt2)
    m = metrics(d.url)
    assert m['meshd_engine_kv_transfer_pulls_by_transport_total{transport="tcp"}'] >= 1


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_pull_gives_identical_greedy_tokens(servers: dict[str, ServerProc],
                                            transport: str) -> None:
    p, d = servers[transport], servers["decode"]
    prompt = make_prompt(PROMPT_LEN, salt=10 + len(transport))
    params = prefill(p, prompt, "same-id")
    assert params["meshd_transport"] == transport and len(params["remote_block_ids"]) == 3
    tokens, pulled, cached = decode(d, prompt, params, "same-id")
    assert pulled and cached == 32
    assert tokens == reference(p, prompt)
    kv = wait_for(lambda: (lambda k: k if k["held"] == 0 else None)(
        http(p.url + "/debug/kv")[1]), 5)
    assert kv and kv["leases"] == 0 and kv["integrity"] == "ok", "on_sent frees the blocks"
    m = metrics(d.url)
    assert m["meshd_engine_kv_transfer_pulls_total"] >= 1
    assert m["meshd_engine_kv_transfer_pulled_bytes_total"] >= 2 * LAYOUT.bytes_per_block
    assert metrics(p.url)["meshd_engine_kv_leases_sent_total"] >= 1


def test_streamed_decode_after_pull(servers: dict[str, ServerProc]) -> None:
    p, d = servers["tcp"], servers["decode"]
    prompt = make_prompt(PROMPT_LEN, salt=20)
    params = prefill(p, prompt, "s")
    status, text, _ = http(d.url + "/v1/completions",
                           body(prompt, kv_transfer_params=params, stream=True))
    assert status == 200 and text.rstrip().endswith("data: [DONE]")
    events = [json.loads(line[6:]) for line in text.splitlines()
              if line.startswith("data: {")]
    tokens = [t for e in events for c in e["choices"] for t in c["token_ids"]]
    assert tokens == reference(p, prompt)


def fallbacks(srv: ServerProc, reason: str) -> float:
    return metrics(srv.url).get(f'meshd_engine_local_prefill_fallbacks_total{{reason="{reason}"}}',
                                0.0)


@pytest.mark.parametrize(("mode", "reason"), [("flip", "corrupt"), ("cut", "truncated")])
def test_faulty_transfer_falls_back_to_local_prefill(servers: dict[str, ServerProc], mode: str,
                                                    reason: str) -> None:
    p, d = servers["tcp"], servers["decode"]
    prompt = make_prompt(PROMPT_LEN, salt=30 + len(mode))
    params = prefill(p, prompt, "f")
    assert p.kv_port is not None
    proxy = FaultProxy(p.kv_port, mode, at=LAYOUT.bytes_per_block)  # inside the payload
    before = fallbacks(d, reason)
    try:
        tokens, pulled, _ = decode(d, prompt, {**params, "remote_port": proxy.port}, "f")
    finally:
        proxy.close()
    assert not pulled and fallbacks(d, reason) == before + 1
    assert tokens == reference(p, prompt)
    assert http(d.url + "/debug/kv")[1]["integrity"] == "ok"


def test_wrong_secret_is_refused_and_falls_back(servers: dict[str, ServerProc]) -> None:
    d = servers["decode"]
    kv = make_kv(LAYOUT, 8, seed=1)
    other = SharedSecretAuthenticator(b"another-mesh-secret-0000", "intruder")
    fake = make_kv_server("tcp", kv, LAYOUT, other, DictSource({"x": [0, 1, 2]}))
    prompt = make_prompt(PROMPT_LEN, salt=40)
    params = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "fake",
              "remote_block_ids": [0, 1, 2], "remote_request_id": "x",
              "remote_host": "127.0.0.1", "remote_port": fake.address.port, "tp_size": 1}
    try:
        tokens, pulled, _ = decode(d, prompt, params, "w")
    finally:
        fake.close()
    assert not pulled and fallbacks(d, "auth") >= 1
    assert tokens == reference(d, prompt)


def test_second_pull_of_same_blocks_is_unknown(servers: dict[str, ServerProc]) -> None:
    """Blocks are freed after the first confirmed pull; a replay of the params must not read
    freed (possibly reused) blocks."""
    p, d = servers["tcp"], servers["decode"]
    prompt = make_prompt(PROMPT_LEN, salt=50)
    params = prefill(p, prompt, "twice")
    assert decode(d, prompt, params, "twice")[1]
    tokens, pulled, _ = decode(d, prompt, params, "twice")
    assert not pulled and fallbacks(d, "unknown_request") >= 1
    assert tokens == reference(p, prompt)


def test_role_checks(servers: dict[str, ServerProc]) -> None:
    status, out, _ = http(servers["decode"].url + "/v1/completions",
                          body([1, 2, 3], kv_transfer_params={"do_remote_decode": True}))
    assert status == 400 and out["error"]["param"] == "kv_transfer_params"


def test_imported_kv_is_really_used(servers: dict[str, ServerProc]) -> None:
    """Control for the identity checks: random KV from a trusted source changes the tokens."""
    d = servers["decode"]
    fake = make_kv_server("tcp", make_kv(LAYOUT, 8, seed=1), LAYOUT,
                          SharedSecretAuthenticator(SECRET.encode(), "fake"),
                          DictSource({"y": [0, 1, 2]}))
    prompt = make_prompt(PROMPT_LEN, salt=60)
    params = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "fake",
              "remote_block_ids": [0, 1, 2], "remote_request_id": "y",
              "remote_host": "127.0.0.1", "remote_port": fake.address.port, "tp_size": 1}
    try:
        tokens, pulled, _ = decode(d, prompt, params, "garbage")
    finally:
        fake.close()
    assert pulled and tokens != reference(servers["tcp"], prompt)


@pytest.mark.parametrize(("change", "reason"), [
    ({"remote_port": 0}, "bad_peer"),
    ({"remote_block_ids": [[0, 1, 2]]}, None),  # HMA-style nesting is accepted
    ({"remote_block_ids": [0]}, "too_few_blocks"),  # the prompt has 2 full blocks
    ({"meshd_transport": "carrier-pigeon"}, "unsupported_transport"),
    ({"meshd_prompt_digest": 7}, "bad_prompt_digest"),
    ({"meshd_transport": "cuda_ipc"}, "transport_unavailable"),  # needs CUDA KV
])
def test_unusable_params_fall_back_by_reason(servers: dict[str, ServerProc],
                                             change: dict[str, Any], reason: str | None) -> None:
    d = servers["decode"]
    prompt = make_prompt(PROMPT_LEN, salt=90)
    params = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "gone",
              "remote_block_ids": [0, 1, 2], "remote_request_id": "nobody",
              "remote_host": "127.0.0.1", "remote_port": 9, "tp_size": 1, **change}
    label = reason or "connect"  # valid params: the pull itself fails (nothing listens)
    before = fallbacks(d, label)
    tokens, pulled, _ = decode(d, prompt, params, "u")
    assert not pulled and fallbacks(d, label) == before + 1
    assert tokens == reference(d, prompt)


def test_cancelled_pull_frees_its_import_blocks_after_the_transfer(
        servers: dict[str, ServerProc]) -> None:
    """A client that disconnects mid-pull cancels the request, but its import blocks stay
    allocated while the transfer thread may still write them; they are freed once the fetch
    returned (here at the decode side's 5 s pull deadline, against a peer that never answers)."""
    d = servers["decode"]
    free0 = http(d.url + "/debug/kv")[1]["free_blocks"]
    timeouts0 = fallbacks(d, "timeout")
    stall = socket.create_server(("127.0.0.1", 0))  # accepts connects, never answers
    params = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "slow",
              "remote_block_ids": [0, 1, 2], "remote_request_id": "slow",
              "remote_host": "127.0.0.1", "remote_port": stall.getsockname()[1], "tp_size": 1}
    u = urlparse(d.url)
    conn = HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request("POST", "/v1/completions",
                     json.dumps(body(make_prompt(PROMPT_LEN, salt=95), kv_transfer_params=params)),
                     {"Content-Type": "application/json"})

        def free() -> int:
            return int(http(d.url + "/debug/kv")[1]["free_blocks"])

        assert wait_for(lambda: free() == free0 - 2, 5), "two import blocks allocated"
        conn.sock.close()  # the client goes away mid-pull
        conn.close()
        time.sleep(1.0)
        assert free() == free0 - 2, "not freed while the transfer thread may write them"
        assert wait_for(lambda: free() == free0, 10), "freed after the fetch returned"
        assert http(d.url + "/debug/kv")[1]["integrity"] == "ok"
        assert fallbacks(d, "timeout") == timeouts0, "cancelled: no fallback, no local prefill"
    finally:
        conn.close()
        stall.close()


def test_params_for_another_prompt_are_refused(servers: dict[str, ServerProc]) -> None:
    p, d = servers["tcp"], servers["decode"]
    params = prefill(p, make_prompt(PROMPT_LEN, salt=70), "m")
    other = make_prompt(PROMPT_LEN, salt=71)
    tokens, pulled, _ = decode(d, other, params, "m")
    assert not pulled and fallbacks(d, "prompt_mismatch") == 1
    assert tokens == reference(p, other)


def write_key(path: Path) -> bytes:
    """An agent-style key file (hex seed, mode 0600); returns the public key."""
    from nacl.signing import SigningKey

    key = SigningKey.generate()
    path.write_text(key.encode().hex() + "\n")
    path.chmod(0o600)
    return bytes(key.verify_key)


def test_ed25519_node_keys(tmp_path: Path) -> None:
    pubs = [write_key(tmp_path / f"{n}.key") for n in ("p", "d")]
    trusted = tmp_path / "trusted"
    trusted.write_text("".join(k.hex() + "\n" for k in pubs))
    procs = []
    try:
        for role in ("prefill", "decode"):
            procs.append(make_server("--role", role, "--kv-node-key",
                                     str(tmp_path / f"{role[0]}.key"), "--kv-trusted-keys",
                                     str(trusted), *SMALL))
        p, d = procs
        prompt = make_prompt(PROMPT_LEN, salt=80)
        tokens, pulled, _ = decode(d, prompt, prefill(p, prompt, "ed"), "ed")
        assert pulled and tokens == reference(p, prompt)
        from nacl.signing import SigningKey

        intruder = Ed25519Authenticator(SigningKey.generate(), pubs)  # d does not trust it
        fake = make_kv_server("tcp", make_kv(LAYOUT, 8, seed=1), LAYOUT, intruder,
                              DictSource({"z": [0, 1, 2]}))
        params = {"do_remote_prefill": True, "do_remote_decode": False,
                  "remote_engine_id": "fake", "remote_block_ids": [0, 1, 2],
                  "remote_request_id": "z", "remote_host": "127.0.0.1",
                  "remote_port": fake.address.port, "tp_size": 1}
        try:
            tokens, pulled, _ = decode(d, prompt, params, "ed2")
        finally:
            fake.close()
        assert not pulled and fallbacks(d, "auth") == 1 and tokens == reference(p, prompt)
    finally:
        assert all(s.stop() == 0 for s in procs)
