"""Logits and greedy tokens equal transformers' Llama/Mixtral with the same weights (fp32).

Tolerance: |logits - hf_logits| <= 1e-4 absolute (fp32, summation order differs).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from meshd.node_agent.engine.config import EngineConfig
from meshd.node_agent.engine.engine import Engine
from meshd.node_agent.engine.runner import Chunk
from tests.node_agent.engine.engine_helpers import generate, make_request

transformers = pytest.importorskip("transformers")
ATOL = 1e-4
BS = 4


def make_checkpoint(path: Path, moe: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    if moe:
        cfg = transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common)
        model = transformers.MixtralForCausalLM(cfg)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    with torch.no_grad():  # spread the weights so logits are not near-ties
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, p.shape[-1] ** -0.5 if p.dim() > 1 and "embed" not in name else 1.0)
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def hf_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module", params=[False, True], ids=["llama", "mixtral"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[torch.nn.Module, Engine]:
    path = tmp_path_factory.mktemp("ckpt")
    hf = make_checkpoint(path, moe=request.param)
    engine = Engine(EngineConfig(model_path=str(path), num_blocks=64, block_size=BS))
    return hf, engine


def test_loaded_config(pair: tuple[torch.nn.Module, Engine]) -> None:
    _, engine = pair
    cfg = engine.model_config
    assert (cfg.rope_theta, cfg.num_kv_heads, cfg.vocab_size) == (5000.0, 2, 96)
    assert engine.layout.shape == (2, 64, BS, 2, 16)


def test_paged_logits_match_prefill_then_decode(pair: tuple[torch.nn.Module, Engine]) -> None:
    hf, engine = pair
    ids = [(i * 13 + 1) % 96 for i in range(30)]
    ref = hf_logits(hf, ids)
    table = list(range(40, 32, -1))  # non-contiguous, descending block ids
    runner = engine.runner
    res = runner.execute([Chunk(ids[:17], 0, table, True)])
    torch.testing.assert_close(res.logits[0], ref[16], atol=ATOL, rtol=0)
    for pos in range(17, 30):
        res = runner.execute([Chunk(ids[pos:pos + 1], pos, table, True)])
        torch.testing.assert_close(res.logits[0], ref[pos], atol=ATOL, rtol=0)


def test_mixed_batch_logits(pair: tuple[torch.nn.Module, Engine]) -> None:
    """One forward holding a prefill chunk, a continuation chunk and a decode token."""
    hf, engine = pair
    a = [(i * 5 + 2) % 96 for i in range(23)]
    b = [(i * 11 + 7) % 96 for i in range(12)]
    ta, tb = [1, 9, 3, 11, 5, 13], [20, 22, 24]
    runner = engine.runner
    runner.execute([Chunk(a[:10], 0, ta, False), Chunk(b[:11], 0, tb, False)])
    res = runner.execute([Chunk(a[10:23], 10, ta, True), Chunk(b[11:12], 11, tb, True)])
    torch.testing.assert_close(res.logits[0], hf_logits(hf, a)[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(res.logits[1], hf_logits(hf, b)[-1], atol=ATOL, rtol=0)


def test_greedy_generation_identical(pair: tuple[torch.nn.Module, Engine]) -> None:
    hf, engine = pair
    prompts = {"p0": [(i * 3 + 1) % 96 for i in range(9)], "p1": [5, 6, 7, 8, 90, 1, 2]}
    got = generate(engine, [make_request(r, p, max_tokens=12) for r, p in prompts.items()])
    for rid, prompt in prompts.items():
        ids = list(prompt)
        for _ in range(12):
            ids.append(int(hf_logits(hf, ids)[-1].argmax()))
        assert got[rid] == ids[len(prompt):], rid
