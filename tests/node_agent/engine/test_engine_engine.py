"""Engine behaviour: batching, prefix cache, chunked prefill, preemption, hold/import, MoE."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from meshd.node_agent.engine.api import EngineRequest, SamplingParams
from meshd.node_agent.engine.events import BlockRemoved, BlockStored, KVEvent
from meshd.scheduler.block_hash import block_hashes
from tests.node_agent.engine.engine_helpers import (
    generate,
    make_engine,
    make_prompt,
    make_request,
    make_small_model,
    run_all,
    tokens_of,
)

PROMPTS = {"a": make_prompt(37), "b": make_prompt(5, 1), "c": make_prompt(70, 2)}


def reference(**kw: object) -> dict[str, list[int]]:
    """Each prompt alone on a fresh engine with roomy limits."""
    return {rid: generate(make_engine(**kw), [make_request(rid, p, 10)])[rid]
            for rid, p in PROMPTS.items()}


@pytest.fixture(scope="module")
def ref_tokens() -> dict[str, list[int]]:
    return reference()


def test_batched_equals_alone(ref_tokens: dict[str, list[int]]) -> None:
    got = generate(make_engine(), [make_request(r, p, 10) for r, p in PROMPTS.items()])
    assert got == ref_tokens


def test_chunked_prefill_same_tokens(ref_tokens: dict[str, list[int]]) -> None:
    engine = make_engine(max_num_batched_tokens=7)
    got = generate(engine, [make_request(r, p, 10) for r, p in PROMPTS.items()])
    assert got == ref_tokens
    assert engine.stats().steps > 70 // 7


GROWING = {f"g{i}": make_prompt(13, 10 * i) for i in range(4)}


@pytest.fixture(scope="module")
def growing_ref() -> dict[str, list[int]]:
    return {rid: generate(make_engine(), [make_request(rid, p, 20)])[rid]
            for rid, p in GROWING.items()}


@pytest.mark.parametrize("caching", [False, True])
def test_preemption_same_tokens(growing_ref: dict[str, list[int]], caching: bool) -> None:
    """4 x 13-token prompts fit 20 blocks of 4; growing to 33 tokens each forces preemption."""
    engine = make_engine(num_blocks=20, enable_prefix_caching=caching)
    got = generate(engine, [make_request(r, p, 20) for r, p in GROWING.items()])
    assert got == growing_ref
    assert engine.stats().preemptions > 0
    assert engine.blocks.num_free_blocks == 20


def test_prefix_hit_skips_compute_and_matches() -> None:
    engine = make_engine()
    shared = make_prompt(40)
    first = generate(engine, [make_request("x", [*shared, 1, 2, 3], 6)])["x"]
    before = engine.stats().forwarded_tokens
    engine.add_request(make_request("y", [*shared, 1, 2, 3], 6))
    outs = run_all(engine)["y"]
    assert tokens_of(outs) == first
    assert outs[0].num_cached_tokens == 40  # 10 full blocks of 4; the last token recomputed
    st = engine.stats()
    assert st.forwarded_tokens - before == 43 - 40 + 5
    assert st.prefix_hits == 40 and st.prefix_queries == 43 * 2


def test_kv_events_match_block_hashes() -> None:
    events: list[KVEvent] = []
    engine = make_engine(num_blocks=8)
    engine._on_kv_event = events.append
    prompt = make_prompt(9)
    generate(engine, [make_request("e", prompt, 3)])
    stored = [x for e in events if isinstance(e, BlockStored) for x in e.block_hashes]
    # prompt + generated tokens: 12 tokens -> 2 blocks computed (the last token has no KV)
    full = prompt + tokens_of([])  # hashes of prompt blocks are a prefix of the stored ones
    assert stored[:2] == block_hashes(full, 4, seed="0")
    first = next(e for e in events if isinstance(e, BlockStored))
    assert first.parent_hash is None and first.token_ids[:4] == tuple(prompt[:4])
    generate(engine, [make_request("f", make_prompt(30, 5), 1)])  # forces evictions
    assert any(isinstance(e, BlockRemoved) for e in events)


def test_sampling_seed_topk_logprobs_and_stop() -> None:
    engine = make_engine()
    p = make_prompt(12)
    greedy = generate(engine, [make_request("g", p, 8)])["g"]
    topk1 = generate(engine, [make_request("k", p, 8, temperature=0.9, top_k=1)])["k"]
    assert topk1 == greedy
    s1 = generate(engine, [make_request("s1", p, 8, temperature=1.0, top_p=0.9, seed=7),
                           make_request("z", make_prompt(20, 3), 4, temperature=1.0)])["s1"]
    s2 = generate(engine, [make_request("s2", p, 8, temperature=1.0, top_p=0.9, seed=7)])["s2"]
    assert s1 == s2
    engine.add_request(make_request("l", p, 3, logprobs=5))
    outs = run_all(engine)["l"]
    for o in outs:
        assert o.logprobs is not None and len(o.logprobs) == 1
        lp = o.logprobs[0]
        assert lp.token_id == o.new_token_ids[0] and len(lp.top) == 5
        assert lp.top[0][0] == lp.token_id and lp.top[0][1] == pytest.approx(lp.logprob)
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


def test_stop_token_and_stop_string() -> None:
    engine = make_engine(model=dataclasses.replace(make_small_model(), vocab_size=263))
    p = make_prompt(12)
    greedy = generate(engine, [make_request("g", p, 8)])["g"]
    engine.add_request(make_request("t", p, 8, stop_token_ids=(greedy[2],)))
    outs = run_all(engine)["t"]
    assert tokens_of(outs) == greedy[:3]
    assert (outs[-1].finish_reason, outs[-1].stop_reason) == ("stop", greedy[2])
    for offset in range(20):  # find a prompt whose greedy text has a clean 2-char stop string
        p = make_prompt(12, offset)
        text = engine.tokenizer.decode(generate(engine, [make_request(f"x{offset}", p, 12)])[
            f"x{offset}"])
        stop = next((text[i:i + 2] for i in range(1, len(text) - 1)
                     if "\ufffd" not in text[:i + 2]), None)
        if stop is not None:
            break
    assert stop is not None
    engine.add_request(make_request("s", p, 12, stop=(stop,)))
    outs = run_all(engine)["s"]
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == stop
    assert "".join(o.text_delta for o in outs) == text[:text.find(stop)]


def test_abort_and_errors() -> None:
    engine = make_engine()
    engine.add_request(make_request("a", make_prompt(10), 50))
    engine.step()
    assert engine.abort("a") and not engine.abort("nope")
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("a", "abort")]
    assert not engine.has_unfinished() and engine.blocks.usage() == 0.0
    with pytest.raises(ValueError, match="empty"):
        engine.add_request(make_request("e", [], 1))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request(make_request("e", [9999], 1))
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(make_request("e", [1] * 600, 1))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_hold_then_import_equals_single_engine() -> None:
    prompt = make_prompt(30, 4)
    single = generate(make_engine(), [make_request("r", prompt, 9)])["r"]
    a, b = make_engine(), make_engine(seed=0)
    req = EngineRequest("r", tuple(prompt), SamplingParams(max_tokens=1, temperature=0.0,
                                                           ignore_eos=True),
                        hold_blocks_on_finish=True)
    a.add_request(req)
    out = run_all(a)["r"][-1]
    assert out.finish_reason == "length" and out.held_block_ids is not None
    assert len(out.held_block_ids) == 8 and a.stats().num_held == 1
    dst = b.allocate_for_import("r", tuple(prompt))
    assert len(dst) == (30 - 1) // 4
    src = list(out.held_block_ids[:len(dst)])
    for ka, kb in zip(a.kv_caches, b.kv_caches, strict=True):
        kb[:, dst] = ka[:, src]
    assert a.release_held("r") and a.blocks.usage() == 0.0
    b.add_request(make_request("r", prompt, 9), imported=True)
    outs = run_all(b)["r"]
    assert tokens_of(outs) == single
    assert outs[0].num_cached_tokens == 28 and b.stats().forwarded_tokens == 2 + 8
    b.blocks.check_integrity()


def test_import_failure_frees_blocks() -> None:
    engine = make_engine()
    ids = engine.allocate_for_import("r", tuple(make_prompt(20)))
    assert len(ids) == 4 and engine.blocks.num_free_blocks == 124
    with pytest.raises(ValueError, match="in use"):
        engine.allocate_for_import("r", (1, 2))
    assert engine.free_import("r") and engine.blocks.num_free_blocks == 128
    with pytest.raises(ValueError, match="allocate_for_import"):
        engine.add_request(make_request("q", [1, 2], 1), imported=True)


def test_moe_expert_stats() -> None:
    engine = make_engine(moe=True)
    engine.add_request(make_request("m", make_prompt(20), 3))
    outs = run_all(engine)["m"]
    counts = outs[0].prompt_expert_counts
    assert counts is not None and len(counts) == 2 and len(counts[0]) == 4
    assert all(sum(layer) == 20 * 2 for layer in counts)
    assert len(outs[0].top_experts(2)) == 2 and outs[1].prompt_expert_counts is None
    total = torch.tensor(engine.stats().expert_counts)
    assert total.sum().item() == engine.stats().forwarded_tokens * 2 * 2
