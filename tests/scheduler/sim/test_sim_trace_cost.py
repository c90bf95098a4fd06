"""Trace loaders on the real files, block-hash mapping, cost model and calibration."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshd.scheduler.sim.timing import EngineTiming, calibrate, h100_llama3_8b
from meshd.scheduler.sim.trace import (
    TraceRequest,
    block_hashes,
    load,
    load_csv,
    load_mooncake,
    subsample,
)

# shared/ sits beside the repository (the Mooncake traces, see shared/traces/README.md)
TRACES = Path(__file__).resolve().parents[4] / "shared" / "traces"
needs_traces = pytest.mark.skipif(not TRACES.is_dir(), reason="shared traces not present")


@needs_traces
def test_conversation_first_lines() -> None:
    trace = load_mooncake(TRACES / "conversation_trace.jsonl", limit=3)
    first = trace[0]
    assert (first.arrival_s, first.input_tokens, first.output_tokens) == (0.0, 6758, 500)
    assert first.hash_ids == tuple(range(14))
    assert trace[1].hash_ids[:2] == (0, 14)
    # shared trace block 0 -> one shared hash at 512, 32 shared engine blocks at 16
    a, b = (block_hashes(r, 512) for r in trace[:2])
    assert len(a) == 6758 // 512 and a[0] == b[0] and a[1] != b[1]
    a16, b16 = (block_hashes(r, 16) for r in trace[:2])
    assert len(a16) == 6758 // 16 and a16[:32] == b16[:32] and a16[32] != b16[32]


@needs_traces
def test_synthetic_first_lines_and_speedup() -> None:
    base = load(TRACES / "synthetic_trace.jsonl", limit=50)
    fast = load(TRACES / "synthetic_trace.jsonl", speedup=4.0, limit=50)
    assert len(base) == 50 and base[0].input_tokens > 0
    assert base[0].hash_ids and len(base[0].hash_ids) == -(-base[0].input_tokens // 512)
    assert [r.arrival_s / 4 for r in base] == pytest.approx([r.arrival_s for r in fast])


def test_csv_loader(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text("timestamp,input_tokens,output_tokens\n2.0,100,5\n1.0,50,0\n")
    trace = load_csv(p, speedup=2.0)
    # times start at 0 and are divided by the speedup; rows sorted; output at least 1
    assert [(r.arrival_s, r.input_tokens, r.output_tokens) for r in trace] == [
        (0.0, 50, 1), (0.5, 100, 5)]
    assert [r.hash_ids for r in trace] == [(), ()]
    hashes = [block_hashes(TraceRequest(f"r{i}", 0, 2048, 1), 512) for i in range(2)]
    assert len(hashes[0]) == 4 and not set(hashes[0]) & set(hashes[1])


def test_block_size_must_divide_512() -> None:
    with pytest.raises(ValueError, match="block_size"):
        block_hashes(TraceRequest("r", 0, 100, 1, (1,)), 100)


def test_subsample_is_seeded() -> None:
    trace = [TraceRequest(f"r{i}", float(i), 10, 1) for i in range(200)]
    assert subsample(trace, 0.5, seed=7) == subsample(trace, 0.5, seed=7)
    assert subsample(trace, 0.5, seed=7) != subsample(trace, 0.5, seed=8)


def test_h100_roofline_figures() -> None:
    c = h100_llama3_8b()
    assert c.prefill_s_per_token == pytest.approx(16e9 / (989e12 * 0.5))
    assert c.decode_step_s(1, 0) == pytest.approx(16e9 / (3.35e12 * 0.7) + 0.001
                                                  + 16e9 / (989e12 * 0.5))
    assert c.kv_bytes_per_token == 131072
    assert c.transfer_s(1000) == pytest.approx(0.0005 + 1000 * 131072 / 50e9)
    assert c.transfer_s(0) == 0.0
    assert set(c.view_params()) == {"prefill_fixed_ms", "prefill_ms_per_token",
                                    "queue_ms_per_waiting", "decode_base_ms",
                                    "decode_ms_per_seq", "decode_ms_per_kctx"}


def test_calibrate_recovers_coefficients() -> None:
    truth = EngineTiming(prefill_overhead_s=0.003, prefill_s_per_token=2e-5,
                      attn_s_per_token_pair=1e-9, decode_overhead_s=0.008,
                      decode_s_per_seq=1e-4, decode_s_per_ctx_token=5e-8)
    prefill = [(n, c, truth.prefill_s(n, c)) for n, c in
               [(128, 0), (1024, 0), (4096, 0), (2048, 2048), (8192, 512)]]
    decode = [(b, ctx, truth.decode_step_s(b, ctx)) for b, ctx in
              [(1, 1000), (8, 8000), (32, 4000), (64, 100000)]]
    fit = calibrate(EngineTiming(), prefill, decode)
    for name in ("prefill_overhead_s", "prefill_s_per_token", "attn_s_per_token_pair",
                 "decode_overhead_s", "decode_s_per_seq", "decode_s_per_ctx_token"):
        assert getattr(fit, name) == pytest.approx(getattr(truth, name), rel=1e-6), name
    with pytest.raises(ValueError, match="prefill"):
        calibrate(EngineTiming(), prefill[:2])


def test_cost_rejects_negative() -> None:
    with pytest.raises(ValueError, match=r"cost\.decode_s_per_seq"):
        EngineTiming(decode_s_per_seq=-1.0)
