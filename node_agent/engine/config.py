"""Configuration of the embedded engine: the model shape and the engine's limits.

`ModelConfig` describes a Llama/Mixtral-style decoder; `tiny_model()` and `tiny_moe_model()` are
the built-in defaults sized for a 2-core CPU. `EngineConfig` composes a model with cache and
batching limits. Both are frozen and validated in `__post_init__` (ValueError naming the field).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {msg}")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape of the decoder. `num_experts == 0` means a dense SwiGLU feed-forward."""

    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 0  # 0: hidden_size // num_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_model_len: int = 2048
    num_experts: int = 0
    experts_per_token: int = 2
    tie_word_embeddings: bool = False
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    name: str = "meshd-tiny"

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "max_model_len"):
            _check(getattr(self, f) >= 1, f"model.{f}", f"must be >= 1, got {getattr(self, f)}")
        _check(self.num_heads % self.num_kv_heads == 0, "model.num_kv_heads",
               f"must divide num_heads={self.num_heads}, got {self.num_kv_heads}")
        _check(self.head_dim >= 0 and self.head_dim % 2 == 0, "model.head_dim",
               f"must be even and >= 0, got {self.head_dim}")
        if self.head_dim == 0:
            _check(self.hidden_size % self.num_heads == 0, "model.hidden_size",
                   f"must be divisible by num_heads={self.num_heads} when head_dim is 0")
            _check((self.hidden_size // self.num_heads) % 2 == 0, "model.hidden_size",
                   "hidden_size // num_heads must be even (RoPE)")
        _check(self.num_experts >= 0, "model.num_experts", f"must be >= 0, got {self.num_experts}")
        if self.num_experts:
            _check(1 <= self.experts_per_token <= self.num_experts, "model.experts_per_token",
                   f"must be in 1..{self.num_experts}, got {self.experts_per_token}")

    @property
    def dim_per_head(self) -> int:
        """Effective head dimension."""
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


def tiny_model() -> ModelConfig:
    """Default dense model: byte vocabulary, 4 layers, hidden 256, GQA 8/4 heads."""
    return ModelConfig()


def tiny_moe_model() -> ModelConfig:
    """Default MoE model: the tiny model with 8 experts, top-2 routing (Mixtral style)."""
    return ModelConfig(intermediate_size=256, num_experts=8, experts_per_token=2,
                       architecture="MixtralForCausalLM", name="meshd-tiny-moe")


def model_config_from_hf(path: str | Path) -> ModelConfig:
    """Read a HF `config.json` for `LlamaForCausalLM` or `MixtralForCausalLM`.

    Accepts both `rope_theta` and transformers 5's `rope_parameters.rope_theta`. Raises
    ValueError for another architecture or a rope scaling type other than default.
    """
    cfg: dict[str, Any] = json.loads((Path(path) / "config.json").read_text())
    arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
    _check(arch in ("LlamaForCausalLM", "MixtralForCausalLM"), "config.json architectures",
           f"must be LlamaForCausalLM or MixtralForCausalLM, got {arch!r}")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    _check(rope_type == "default", "config.json rope_type", f"unsupported: {rope_type!r}")
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    eos = cfg.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return ModelConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        head_dim=cfg.get("head_dim") or 0, rope_theta=theta,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_model_len=int(cfg.get("max_position_embeddings", 2048)),
        num_experts=int(cfg.get("num_local_experts", 0)) if arch == "MixtralForCausalLM" else 0,
        experts_per_token=int(cfg.get("num_experts_per_tok", 2)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), architecture=arch,
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=eos, name=Path(path).name)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """The engine: which model, how it is loaded, cache size and batching limits.

    `model_path` "" uses `model` with seeded random weights (vLLM `--load-format dummy`);
    otherwise a local HF directory (config.json + *.safetensors, optional tokenizer.json) whose
    config replaces `model`. `prefix_hash_seed` plays vLLM's PYTHONHASHSEED (None: random).
    """

    model: ModelConfig = field(default_factory=tiny_model)
    model_path: str = ""
    seed: int = 0
    dtype: str = "float32"  # "float32" | "bfloat16" | "float16"
    block_size: int = 16
    num_blocks: int = 512
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 1024
    enable_prefix_caching: bool = True
    prefix_hash_seed: str | None = "0"
    engine_id: str = "meshd-engine"
    record_experts: bool = True
    enable_kv_events: bool = False  # buffer block events for Engine.take_kv_events()

    def __post_init__(self) -> None:
        _check(self.dtype in ("float32", "bfloat16", "float16"), "engine.dtype",
               f"must be float32, bfloat16 or float16, got {self.dtype!r}")
        for f in ("block_size", "num_blocks", "max_num_seqs", "max_num_batched_tokens"):
            _check(getattr(self, f) >= 1, f"engine.{f}", f"must be >= 1, got {getattr(self, f)}")
