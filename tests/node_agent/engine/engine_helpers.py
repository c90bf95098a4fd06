"""Helpers shared by the engine tests (`make_*`)."""

from __future__ import annotations

from meshd.node_agent.engine.api import EngineRequest, RequestOutput, SamplingParams
from meshd.node_agent.engine.config import EngineConfig, ModelConfig
from meshd.node_agent.engine.engine import Engine


def make_small_model(moe: bool = False) -> ModelConfig:
    """Smaller than the default tiny model so that the suite stays fast."""
    if moe:
        return ModelConfig(hidden_size=64, intermediate_size=64, num_layers=2, num_heads=4,
                           num_kv_heads=2, num_experts=4, experts_per_token=2,
                           architecture="MixtralForCausalLM", max_model_len=512)
    return ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, max_model_len=512)


def make_engine(moe: bool = False, **kw: object) -> Engine:
    cfg = {"model": make_small_model(moe), "num_blocks": 128, "block_size": 4, **kw}
    return Engine(EngineConfig(**cfg))  # type: ignore[arg-type]


def make_request(rid: str, prompt: list[int] | tuple[int, ...], max_tokens: int = 8,
                 **sp: object) -> EngineRequest:
    params = SamplingParams(max_tokens=max_tokens, **{"temperature": 0.0, "ignore_eos": True,
                                                      **sp})  # type: ignore[arg-type]
    return EngineRequest(rid, tuple(prompt), params)


def make_prompt(n: int, offset: int = 0) -> list[int]:
    return [(7 * i + 3 + offset) % 250 for i in range(n)]


def run_all(engine: Engine, max_steps: int = 10_000) -> dict[str, list[RequestOutput]]:
    """Step until idle; outputs grouped by request id."""
    out: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for o in engine.step():
            out.setdefault(o.request_id, []).append(o)
        engine.blocks.check_integrity()
    return out


def tokens_of(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def generate(engine: Engine, requests: list[EngineRequest]) -> dict[str, list[int]]:
    for r in requests:
        engine.add_request(r)
    return {rid: tokens_of(o) for rid, o in run_all(engine).items()}
