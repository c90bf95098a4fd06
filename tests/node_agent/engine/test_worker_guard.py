"""Issue 12 §5: a worker's serving API answers only bearers of its token, and the KV blocks it
holds for decode peers are bounded per caller and in all (429 past a bound).

Real engine processes over loopback; a second caller is a second loopback source address.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from meshd.kv_transfer.lease_quota import LeaseQuota

from .server_helpers import SECRET, ServerProc, http, make_prompt, make_server, metrics, wait_for

TOKEN = "worker-token-0123456789abcdef"
PROMPT_LEN = 100  # 7 blocks of 16
LEASE_S = 3.0


@pytest.fixture(scope="module")
def prefill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    token_file = Path(tmp_path_factory.mktemp("tok")) / "worker_token"
    token_file.write_text(TOKEN + "\n")
    srv = make_server("--role", "prefill", "--kv-secret", SECRET, "--num-blocks", "64",
                      "--block-size", "16", "--max-model-len", "256", "--max-num-seqs", "8",
                      "--api-key-file", str(token_file), "--max-leased-blocks", "24",
                      "--max-leased-blocks-per-caller", "16",
                      "--lease-timeout-s", str(LEASE_S), "--kv-events-port", "0",
                      "--kv-replay-port", "0")
    try:
        yield srv
    finally:
        assert srv.stop() == 0


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _produce(srv: ServerProc, salt: int, source: str = "127.0.0.1"
             ) -> tuple[int, dict[str, Any], dict[str, str]]:
    """A do_remote_decode prefill (what the gateway sends P) from loopback address `source`."""
    body = {"model": "meshd-tiny", "prompt": make_prompt(PROMPT_LEN, salt), "max_tokens": 1,
            "stream": False, "kv_transfer_params": {"do_remote_decode": True}}
    u = urlparse(srv.url)
    conn = HTTPConnection(u.hostname, u.port, timeout=30, source_address=(source, 0))
    try:
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"Content-Type": "application/json", **AUTH})
        r = conn.getresponse()
        return r.status, json.loads(r.read()), dict(r.getheaders())
    finally:
        conn.close()


def _quota(srv: ServerProc) -> dict[str, Any]:
    status, out, _ = http(srv.url + "/debug/kv", headers=AUTH)
    assert status == 200, out
    return out["lease_quota"]  # type: ignore[no-any-return]


def test_serving_calls_need_the_token(prefill: ServerProc) -> None:
    body = {"model": "meshd-tiny", "prompt": make_prompt(20), "max_tokens": 1}
    for path, payload in (("/v1/completions", body), ("/v1/models", None),
                          ("/debug/kv", None)):
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"},
                        {"Authorization": TOKEN}):  # the scheme is required
            status, out, _ = http(prefill.url + path, payload, headers=headers)
            assert status == 401, (path, headers, out)
            assert out["error"]["type"] == "authentication_error"
            assert out["error"]["code"] == "invalid_api_key"
    status, out, _ = http(prefill.url + "/v1/completions", body, headers=AUTH)
    assert status == 200 and out["usage"]["completion_tokens"] == 1
    assert http(prefill.url + "/health")[0] == 200  # as on vLLM: health and metrics stay open
    assert metrics(prefill.url)["meshd_engine_kv_leased_blocks_bound"] == 24


def test_leases_are_bounded_per_caller_and_in_all(prefill: ServerProc) -> None:
    assert wait_for(lambda: _quota(prefill)["blocks"] == 0, LEASE_S + 5)
    # caller A holds 2 x 7 blocks; a third (21 > its 16) is refused, with a Retry-After
    for salt in (1, 2):
        status, out, _ = _produce(prefill, salt)
        assert status == 200 and out["kv_transfer_params"]["do_remote_prefill"], out
    status, out, headers = _produce(prefill, 3)
    assert status == 429, out
    assert out["error"]["code"] == "kv_leases_exhausted"
    assert "caller 127.0.0.1" in out["error"]["message"] and "bound 16" in out["error"]["message"]
    assert headers.get("Retry-After") == "1"
    # caller B has a bound of its own, but the total (24) stops its second
    status, out, _ = _produce(prefill, 4, source="127.0.0.2")
    assert status == 200, out
    status, out, _ = _produce(prefill, 5, source="127.0.0.2")
    assert status == 429 and "all callers" in out["error"]["message"], out
    q = _quota(prefill)
    assert q["blocks"] == 21 and q["leases"] == 3
    assert q["callers"] == {"127.0.0.1": 14, "127.0.0.2": 7}
    m = metrics(prefill.url)
    assert m['meshd_engine_kv_lease_refusals_total{bound="caller"}'] >= 1
    assert m['meshd_engine_kv_lease_refusals_total{bound="total"}'] >= 1
    # nobody pulls: the leases expire, their blocks stop counting, and A is served again
    assert wait_for(lambda: _quota(prefill)["blocks"] == 0, LEASE_S + 10, every_s=0.2)
    status, out, _ = _produce(prefill, 6)
    assert status == 200, out


def test_kv_events_are_hashes_for_holders_of_the_token(prefill: ServerProc) -> None:
    """Issue 12 §4: the worker's KV-event port serves CURVE keyed by its token and publishes
    block hashes without token ids; a subscriber without the token reads nothing."""
    import msgpack
    import zmq

    from meshd.curve import curve_keys, secure_client

    assert prefill.events
    ctx = zmq.Context.instance()
    socks = []
    for token in ("", TOKEN):
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.LINGER, 0)
        if token:
            secure_client(sub, curve_keys(token))
        sub.connect(prefill.events.replace("0.0.0.0", "127.0.0.1"))
        socks.append(sub)
    try:
        time.sleep(0.5)  # handshakes
        body = {"model": "meshd-tiny", "prompt": make_prompt(40, 99), "max_tokens": 1}
        assert http(prefill.url + "/v1/completions", body, headers=AUTH)[0] == 200
        stranger, member = socks
        assert member.poll(10_000), "the token holder got no KV events"
        events = msgpack.unpackb(member.recv_multipart()[2])["events"]
        stored = [e for e in events if e["type"] == "BlockStored"]
        assert stored and all(e["block_hashes"] and e["token_ids"] == [] for e in stored)
        assert stranger.poll(500) == 0
    finally:
        for sock in socks:
            sock.close(0)


# ---- the accounting, as plain data


def test_quota_reserves_settles_and_ends() -> None:
    q = LeaseQuota(max_blocks=10, max_blocks_per_caller=6)
    assert q.admit("a", 4) is None
    refusal = q.admit("a", 4)  # 8 > 6
    assert refusal is not None and (refusal.scope, refusal.used, refusal.need) == ("caller", 4, 4)
    assert q.admit("b", 6) is None
    refusal = q.admit("c", 1)  # 11 > 10
    assert refusal is not None and refusal.scope == "total"
    q.settle("a", 4, "r1", 3)  # the lease held fewer blocks than reserved
    q.settle("b", 6, "r2", 0)  # no lease (stopped early): nothing held
    assert q.snapshot()["callers"] == {"a": 3} and q.snapshot()["blocks"] == 3
    q.end("r1")
    q.end("r1")  # idempotent
    q.end("never-settled")
    assert q.snapshot()["blocks"] == 0 and q.snapshot()["callers"] == {}
    assert q.snapshot()["refused"] == {"caller": 1, "total": 1}


def test_quota_admits_an_oversized_request_alone_and_survives_end_before_settle() -> None:
    q = LeaseQuota(max_blocks=4, max_blocks_per_caller=2)
    assert q.admit("a", 9) is None  # larger than both bounds, but nothing else is held
    assert q.admit("b", 1) is not None
    q.end("r")  # the lease ended (pulled) before the handler settled it
    q.settle("a", 9, "r", 9)
    q.end("r")  # the handler's re-check ends it again: it stops counting
    assert q.snapshot()["blocks"] == 0
    with pytest.raises(ValueError, match="lease bounds"):
        LeaseQuota(0, 1)
