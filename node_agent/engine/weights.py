"""Building a `DecoderModel` with weights: seeded random (vLLM `--load-format dummy`) or a local
HF directory (`config.json` + `*.safetensors`) for `LlamaForCausalLM` / `MixtralForCausalLM`.

HF names map one to one onto the module's names, except Mixtral's per-expert
`block_sparse_moe.experts.{e}.w{1,2,3}.weight`, copied into the stacked `moe.w{1,2,3}[e]`, and
`block_sparse_moe.gate.weight` -> `moe.gate.weight`. Missing or unexpected tensors raise
ValueError naming them (a missing `lm_head.weight` is allowed with tied embeddings).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from meshd.node_agent.engine.config import ModelConfig, model_config_from_hf
from meshd.node_agent.engine.model import DecoderModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_EXPERT = re.compile(r"^(layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")


def random_model(cfg: ModelConfig, seed: int, dtype: str = "float32") -> DecoderModel:
    """Model with deterministic random weights: same (cfg, seed) gives the same tensors.

    Linear weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm weights 1 (so that logits are
    well spread and greedy decoding is not dominated by near-ties).
    """
    model = DecoderModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name == "embed_tokens.weight":
                p.normal_(0.0, 1.0, generator=gen)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
    return model.to(DTYPES[dtype]).eval()


def _target_name(hf_name: str) -> str:
    name = hf_name.removeprefix("model.")
    return name.replace(".block_sparse_moe.gate.", ".moe.gate.")


def load_hf_model(path: str | Path, dtype: str = "float32") -> tuple[ModelConfig, DecoderModel]:
    """Config and model from a local HF directory (safetensors only)."""
    from safetensors.torch import load_file

    root = Path(path)
    cfg = model_config_from_hf(root)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{root}: no *.safetensors files")
    model = DecoderModel(cfg)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    with torch.no_grad():
        for f in files:
            for hf_name, tensor in load_file(str(f)).items():
                m = _EXPERT.match(hf_name.removeprefix("model."))
                if m:
                    target = f"{m.group(1)}.moe.{m.group(3)}"
                    params[target][int(m.group(2))].copy_(tensor)
                    loaded.add(f"{target}[{m.group(2)}]")
                    continue
                name = _target_name(hf_name)
                if name not in params:
                    raise ValueError(f"{root}: unexpected tensor {hf_name!r}")
                if params[name].shape != tensor.shape:
                    raise ValueError(f"{root}: {hf_name!r} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(params[name].shape)}")
                params[name].copy_(tensor)
                loaded.add(name)
    if cfg.tie_word_embeddings or "lm_head.weight" not in loaded:
        model.lm_head.weight = model.embed_tokens.weight
        loaded.add("lm_head.weight")
    missing = [n for n in _expected(params, cfg) if n not in loaded]
    if missing:
        more = "..." if len(missing) > 5 else ""
        raise ValueError(f"{root}: missing tensors {missing[:5]}{more}")
    return cfg, model.to(DTYPES[dtype]).eval()


def _expected(params: dict[str, torch.nn.Parameter], cfg: ModelConfig) -> list[str]:
    out: list[str] = []
    for name in params:
        if re.search(r"\.moe\.w[123]$", name):
            out.extend(f"{name}[{e}]" for e in range(cfg.num_experts))
        else:
            out.append(name)
    return out
