"""Analytic cost model: how long a prefill, a decode step and a KV transfer take.

Formulae (times in seconds; every coefficient is a field, so a fit or a test can set them):

    prefill(batch)   = prefill_overhead_s
                       + prefill_s_per_token * sum(new_i)
                       + attn_s_per_token_pair * sum(new_i * (cached_i + new_i / 2))
    decode_step(b,c) = decode_overhead_s + decode_s_per_seq * b + decode_s_per_ctx_token * c
    transfer(t)      = link_latency_s + t * kv_bytes_per_token / link_bytes_per_s

`new_i` are the prompt tokens request i must compute (not cached), `cached_i` the reused prefix,
`b` the decode batch size and `c` the batch's total context tokens. Prefill is compute-bound
(linear FLOPs of the weights plus the causal attention term); a decode step is memory-bound
(weights plus every sequence's KV read once from HBM) with a small per-sequence compute term.

`h100_llama3_8b()` derives the defaults from a roofline: Llama-3-8B in fp16/bf16 (8.0e9
parameters, 16 GB of weights, 32 layers x 8 KV heads x 128 dims x 2 (K,V) x 2 bytes = 128 KiB of
KV per token) on one H100 SXM (989 TFLOP/s dense bf16, 3.35 TB/s HBM) at 50% MFU for prefill and
70% of HBM bandwidth for decode, with a 400 Gb/s (50 GB/s) RDMA link between workers.
`calibrate()` replaces the prefill and decode coefficients by a least-squares fit to measurements.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class EngineTiming:
    """Coefficients of the formulae in the module docstring; all must be >= 0."""

    prefill_overhead_s: float = 0.0
    prefill_s_per_token: float = 0.0
    attn_s_per_token_pair: float = 0.0
    decode_overhead_s: float = 0.0
    decode_s_per_seq: float = 0.0
    decode_s_per_ctx_token: float = 0.0
    kv_bytes_per_token: float = 131072.0
    link_bytes_per_s: float = 50e9
    link_latency_s: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not value >= 0.0:
                raise ValueError(f"cost.{f.name}: must be >= 0, got {value}")
        if self.link_bytes_per_s <= 0.0:
            raise ValueError("cost.link_bytes_per_s: must be > 0")

    def prefill_s(self, new_tokens: int, cached_tokens: int = 0) -> float:
        """One request prefilled alone."""
        return self.prefill_overhead_s + self.prefill_item_s(new_tokens, cached_tokens)

    def prefill_item_s(self, new_tokens: int, cached_tokens: int) -> float:
        """One request's share of a prefill batch, without the per-batch overhead."""
        return (self.prefill_s_per_token * new_tokens
                + self.attn_s_per_token_pair * new_tokens * (cached_tokens + new_tokens / 2))

    def decode_step_s(self, batch: int, context_tokens: int) -> float:
        """One decode step of `batch` sequences holding `context_tokens` tokens in all."""
        return (self.decode_overhead_s + self.decode_s_per_seq * batch
                + self.decode_s_per_ctx_token * context_tokens)

    def transfer_s(self, tokens: int) -> float:
        """Moving the KV of `tokens` tokens over one link (0 tokens: free)."""
        if tokens <= 0:
            return 0.0
        return self.link_latency_s + tokens * self.kv_bytes_per_token / self.link_bytes_per_s

    def view_params(self, typical_prompt_tokens: int = 8192) -> dict[str, float]:
        """The coefficients as `WorkerView.cost` for the scheduler's SLO scorer
        (`meshd.scheduler.cost_model` keys, milliseconds). Its prefill cost is linear, so the
        attention term is folded in at a prompt of `typical_prompt_tokens`, which also sets the
        expected delay per waiting request."""
        n = typical_prompt_tokens
        per_token = self.prefill_s_per_token + self.attn_s_per_token_pair * n / 2
        return {"prefill_fixed_ms": 1e3 * self.prefill_overhead_s,
                "prefill_ms_per_token": 1e3 * per_token,
                "queue_ms_per_waiting": 1e3 * self.prefill_s(n),
                "decode_base_ms": 1e3 * self.decode_overhead_s,
                "decode_ms_per_seq": 1e3 * self.decode_s_per_seq,
                "decode_ms_per_kctx": 1e6 * self.decode_s_per_ctx_token}


def h100_llama3_8b(mfu: float = 0.5, hbm_efficiency: float = 0.7,
                   link_bytes_per_s: float = 50e9) -> EngineTiming:
    """Roofline defaults for Llama-3-8B fp16 on one H100 (see the module docstring)."""
    params, layers, d_model = 8.0e9, 32, 4096
    weight_bytes, kv_bytes = 16e9, 32 * 8 * 128 * 2 * 2
    flops, hbm = 989e12 * mfu, 3.35e12 * hbm_efficiency
    return EngineTiming(
        prefill_overhead_s=0.002,
        prefill_s_per_token=2 * params / flops,
        attn_s_per_token_pair=4 * layers * d_model / flops,
        decode_overhead_s=weight_bytes / hbm + 0.001,
        decode_s_per_seq=2 * params / flops,
        decode_s_per_ctx_token=kv_bytes / hbm,
        kv_bytes_per_token=float(kv_bytes),
        link_bytes_per_s=link_bytes_per_s,
        link_latency_s=0.0005,
    )


def linear(prefill_s_per_token: float, decode_step_s: float,
           transfer_s_per_token: float = 0.0) -> EngineTiming:
    """A cost model without overheads or context terms, for hand-checkable tests."""
    return EngineTiming(prefill_s_per_token=prefill_s_per_token, decode_overhead_s=decode_step_s,
                     kv_bytes_per_token=1.0,
                     link_bytes_per_s=1.0 / transfer_s_per_token if transfer_s_per_token else 1e30)


def _fit(columns: list[list[float]], seconds: Sequence[float]) -> list[float]:
    a = np.array(columns, dtype=np.float64).T
    coef, *_ = np.linalg.lstsq(a, np.array(seconds, dtype=np.float64), rcond=None)
    return [max(0.0, float(c)) for c in coef]


def calibrate(base: EngineTiming,
              prefill: Sequence[tuple[int, int, float]] = (),
              decode: Sequence[tuple[int, int, float]] = ()) -> EngineTiming:
    """Fit the prefill and/or decode coefficients of `base` to measured points.

    `prefill` holds (new_tokens, cached_tokens, seconds) for single-request prefills, `decode`
    holds (batch, context_tokens, seconds) per step; e.g. the embedded engine's benchmark output.
    Each set needs at least 3 points; an empty set leaves those coefficients as they are.
    Negative fitted coefficients are clipped to 0.
    """
    out = base
    if prefill:
        if len(prefill) < 3:
            raise ValueError("prefill: need >= 3 measurements")
        pairs = [n * (c + n / 2) for n, c, _ in prefill]
        o, lin, attn = _fit([[1.0] * len(prefill), [float(n) for n, _, _ in prefill], pairs],
                            [s for _, _, s in prefill])
        out = dataclasses.replace(out, prefill_overhead_s=o, prefill_s_per_token=lin,
                                  attn_s_per_token_pair=attn)
    if decode:
        if len(decode) < 3:
            raise ValueError("decode: need >= 3 measurements")
        o, seq, ctx = _fit([[1.0] * len(decode), [float(b) for b, _, _ in decode],
                            [float(c) for _, c, _ in decode]], [s for _, _, s in decode])
        out = dataclasses.replace(out, decode_overhead_s=o, decode_s_per_seq=seq,
                                  decode_s_per_ctx_token=ctx)
    return out
