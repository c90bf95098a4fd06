"""Llama/Mixtral-style decoder over a paged KV cache (CPU torch).

RMSNorm, rotary embeddings (rotate-half form, `rope_theta`), grouped-query attention, SwiGLU or a
Mixtral MoE feed-forward (softmax over experts, top-k, renormalised). Numerically this follows
transformers' `LlamaForCausalLM` / `MixtralForCausalLM` in fp32.

KV cache: one tensor per layer shaped `(2, num_blocks, block_size, num_kv_heads, head_dim)`
(vLLM's FlashAttention layout; index 0 keys, 1 values). The forward takes a flattened batch of
tokens from several sequences (prefill chunks and decode tokens mixed); `AttnMetadata` says
where each sequence's tokens lie and which blocks hold its context. The forward writes the new
tokens' K/V into their slots, then attends over each sequence's whole context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from meshd.node_agent.engine.config import ModelConfig


@dataclass(frozen=True, slots=True)
class SeqSlice:
    """One sequence's tokens in the flattened batch: `[start, end)`; after this forward its
    first `context_len` positions have KV in the blocks `block_table` (in order)."""

    start: int
    end: int
    context_len: int
    block_table: torch.Tensor  # int64, covers context_len


@dataclass(frozen=True, slots=True)
class AttnMetadata:
    """Per-step batch layout. Decode sequences (one token) are batched into padded tensors."""

    prefills: tuple[SeqSlice, ...]
    decode_index: torch.Tensor  # (D,) flattened positions of decode tokens
    decode_tables: torch.Tensor  # (D, max_blocks) int64, padded with 0
    decode_lens: torch.Tensor  # (D,) int64 context lengths
    slot_mapping: torch.Tensor  # (T,) int64: block_id * block_size + offset


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Rotary(nn.Module):
    """Rotate-half RoPE with a precomputed cos/sin table over `max_model_len` positions."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, theta: float, max_len: int) -> None:
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos = self.cos[positions].unsqueeze(1).to(x.dtype)
        sin = self.sin[positions].unsqueeze(1).to(x.dtype)
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hd = cfg.dim_per_head
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * hd, bias=False)
        self.o_proj = nn.Linear(self.nh * hd, cfg.hidden_size, bias=False)
        self.scale = hd ** -0.5

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: Rotary,
                meta: AttnMetadata, cache: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        q = rope(self.q_proj(x).view(t, self.nh, self.hd), positions)
        k = rope(self.k_proj(x).view(t, self.nkv, self.hd), positions)
        v = self.v_proj(x).view(t, self.nkv, self.hd)
        nb, bs = cache.shape[1], cache.shape[2]
        kc = cache[0].view(nb * bs, self.nkv, self.hd)
        vc = cache[1].view(nb * bs, self.nkv, self.hd)
        kc[meta.slot_mapping] = k
        vc[meta.slot_mapping] = v
        out = torch.empty_like(q)
        for s in meta.prefills:
            out[s.start:s.end] = self._prefill(q[s.start:s.end], cache, s)
        if meta.decode_index.numel():
            out[meta.decode_index] = self._decode(q[meta.decode_index], cache, meta)
        return self.o_proj(out.view(t, self.nh * self.hd))

    def _prefill(self, q: torch.Tensor, cache: torch.Tensor, s: SeqSlice) -> torch.Tensor:
        ql, ctx = q.shape[0], s.context_len
        kv = torch.index_select(cache, 1, s.block_table).flatten(1, 2)[:, :ctx]
        keys, vals = kv[0].transpose(0, 1), kv[1].transpose(0, 1)  # (nkv, ctx, hd)
        qpos = torch.arange(ctx - ql, ctx)[:, None]
        mask = torch.arange(ctx)[None, :] <= qpos
        o = F.scaled_dot_product_attention(q.transpose(0, 1), keys, vals, attn_mask=mask,
                                           scale=self.scale, enable_gqa=True)
        return o.transpose(0, 1)

    def _decode(self, q: torch.Tensor, cache: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        d, width = meta.decode_tables.shape
        kv = torch.index_select(cache, 1, meta.decode_tables.flatten())
        kv = kv.view(2, d, width * cache.shape[2], self.nkv, self.hd).transpose(2, 3)
        keys, vals = kv[0], kv[1]  # (D, nkv, K, hd)
        mask = torch.arange(keys.shape[2])[None, :] < meta.decode_lens[:, None]
        o = F.scaled_dot_product_attention(q.view(d, self.nh, 1, self.hd), keys, vals,
                                           attn_mask=mask[:, None, None, :], scale=self.scale,
                                           enable_gqa=True)
        return o.view(d, self.nh, self.hd)


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Mixtral sparse MoE: experts' w1 (gate), w3 (up), w2 (down) stacked per expert."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.top_k = cfg.experts_per_token
        self.gate = nn.Linear(h, e, bias=False)
        self.w1 = nn.Parameter(torch.empty(e, i, h))
        self.w3 = nn.Parameter(torch.empty(e, i, h))
        self.w2 = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: torch.Tensor, routes: list[torch.Tensor] | None) -> torch.Tensor:
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        if routes is not None:
            routes.append(chosen)
        out = torch.zeros_like(x)
        for e in torch.unique(chosen).tolist():
            tok, slot = torch.nonzero(chosen == e, as_tuple=True)
            xe = x[tok]
            ye = F.linear(F.silu(F.linear(xe, self.w1[e])) * F.linear(xe, self.w3[e]), self.w2[e])
            out.index_add_(0, tok, ye * weights[tok, slot, None])
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: MLP | None = None if cfg.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.moe: MoE | None = MoE(cfg) if cfg.is_moe else None


class DecoderModel(nn.Module):
    """The whole decoder. Parameters are created uninitialised; see `weights.py`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = Rotary(cfg.dim_per_head, cfg.rope_theta, cfg.max_model_len)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata,
                kv_caches: list[torch.Tensor],
                routes: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Hidden states (T, hidden) after the final norm; writes new K/V into `kv_caches`.

        With `routes`, MoE layers append their (T, top_k) chosen expert ids, one per layer.
        """
        h = self.embed_tokens(input_ids)
        for module, cache in zip(self.layers, kv_caches, strict=True):
            layer = cast(DecoderLayer, module)
            h = h + layer.self_attn(layer.input_layernorm(h), positions, self.rope, meta, cache)
            x = layer.post_attention_layernorm(h)
            if layer.moe is not None:
                h = h + layer.moe(x, routes)
            else:
                assert layer.mlp is not None
                h = h + layer.mlp(x)
        return self.norm(h)

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits (N, vocab) for the given hidden rows."""
        return self.lm_head(hidden).float()
