#!/usr/bin/env python3
"""Build tiny random-weight checkpoints (Llama and Mixtral) that vLLM can load, with no download.

    python scripts/make_tiny_model.py OUT_DIR [--kind llama|mixtral|both] [--seed 0]

writes `OUT_DIR/tiny-llama/` and/or `OUT_DIR/tiny-mixtral/`, each with `config.json`,
`model.safetensors`, `generation_config.json`, `tokenizer.json` and `tokenizer_config.json`
(with a chat template, so `/v1/chat/completions` works).

The tokenizer is a byte-level BPE trained with the `tokenizers` library on a few built-in sentences:
byte-level means any text encodes (no unknown tokens), and the vocabulary stays small (~512).
Everything is deterministic for a given seed. Shapes are chosen for vLLM's CPU backend: head_dim 64
(a size its attention kernels support), bf16 weights, short max_position_embeddings so the KV cache
and warm-up stay small. Weights are random, so the generated text is gibberish; that is fine for
exercising scheduling, prefix caching, KV events, metrics and MoE routing.

Needs `torch`, `transformers` and `tokenizers` (meshd's main venv has them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

VOCAB_SIZE = 512
SPECIAL = ["<s>", "</s>", "<unk>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A distributed inference coordinator routes requests to workers with warm prefix caches.",
    "Mixture of experts models activate a few experts for every token in every layer.",
    "Prefill computes the key value cache of the prompt; decode produces one token at a time.",
    "Block hashes chain each full block of tokens to its parent block.",
    "user: hello, how are you today? assistant: I am fine, thank you for asking.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and punctuation , . ; : ! ? ( ) [ ] { } - _ / \\ ' \"",
    "system: you are a helpful assistant that answers briefly and precisely.",
]


def build_tokenizer(out: Path) -> int:
    """Train a byte-level BPE on CORPUS; write tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 2048, "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
    }, indent=2) + "\n")
    return tok.get_vocab_size()


def _common(vocab: int) -> dict[str, object]:
    return dict(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64,
        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1, pad_token_id=3,
    )


def build(kind: str, out: Path, seed: int) -> Path:
    import torch
    from transformers import GenerationConfig, LlamaConfig, MixtralConfig

    d = out / f"tiny-{kind}"
    d.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(d)
    # Pad the embedding to a multiple of 64 (keeps vLLM's vocab-parallel layers happy).
    vocab_padded = (vocab + 63) // 64 * 64
    torch.manual_seed(seed)
    if kind == "llama":
        from transformers import LlamaForCausalLM

        cfg = LlamaConfig(**_common(vocab_padded))
        model = LlamaForCausalLM(cfg)
    elif kind == "mixtral":
        from transformers import MixtralForCausalLM

        cfg = MixtralConfig(**_common(vocab_padded), num_local_experts=4,
                            num_experts_per_tok=2, sliding_window=None)
        model = MixtralForCausalLM(cfg)
    else:
        raise ValueError(f"kind: llama or mixtral, got {kind!r}")
    model = model.to(torch.bfloat16)
    model.save_pretrained(d, safe_serialization=True)
    GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=3).save_pretrained(d)
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--kind", choices=["llama", "mixtral", "both"], default="both")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    kinds = ["llama", "mixtral"] if a.kind == "both" else [a.kind]
    for k in kinds:
        print(build(k, a.out, a.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
