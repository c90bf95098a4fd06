"""Typed contracts of the engine's step API (what the HTTP server and kv_transfer see).

All frozen and slotted. Validation raises ValueError naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshd.node_agent.engine.timings import HistogramSnapshot


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {msg}")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling, OpenAI/vLLM semantics.

    `temperature` 0 is greedy. `top_k` 0 or -1 disables it, `top_p` 1.0 disables it. `seed` gives
    the request its own generator (reproducible regardless of batch). `logprobs` None: none;
    n >= 0: the sampled token's logprob plus the top n (raw model distribution, before
    temperature/top-k/top-p, like vLLM's default). Stop strings are cut from the text
    unless `include_stop_str_in_output`.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    confidence: bool = False  # meshd: score each sampled token (exp(-entropy), raw logits)

    def __post_init__(self) -> None:
        _check(self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}")
        _check(self.temperature >= 0.0, "temperature", f"must be >= 0, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= -1, "top_k", f"must be -1, 0 or positive, got {self.top_k}")
        _check(self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs",
               f"must be in 0..20, got {self.logprobs}")
        _check(all(self.stop), "stop", "stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One generation request. `hold_blocks_on_finish`: if it finishes by the length cap, keep
    its KV blocks (ids in `RequestOutput.held_block_ids`) until `Engine.release_held`."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    hold_blocks_on_finish: bool = False


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """Logprob of a generated token and the top-n alternatives, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one `step()` produced for one request (deltas, not cumulative).

    `finish_reason` is "stop", "length" or "abort" once `finished`; `stop_reason` is the stop
    string or stop token id that ended it (None for EOS or length). `prompt_expert_counts`
    (MoE only) is set on the output that completes the prompt: per layer, per expert, how many
    of the prompt's computed tokens were routed there (cached/imported tokens not counted).
    """

    request_id: str
    new_token_ids: tuple[int, ...]
    text_delta: str
    finished: bool
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    held_block_ids: tuple[int, ...] | None = None
    prompt_expert_counts: tuple[tuple[int, ...], ...] | None = None
    confidence: tuple[float, ...] | None = None  # per new token, when sampling.confidence

    def top_experts(self, n: int) -> tuple[int, ...]:
        """Expert ids most used by the prompt, summed over layers (empty if not MoE)."""
        if not self.prompt_expert_counts:
            return ()
        totals = [sum(col) for col in zip(*self.prompt_expert_counts, strict=True)]
        order = sorted(range(len(totals)), key=lambda e: (-totals[e], e))
        return tuple(e for e in order[:n] if totals[e] > 0)


@dataclass(frozen=True, slots=True)
class KVLayout:
    """How the KV cache is laid out: per layer one tensor of `shape`, block ids index dim 1."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Counters since start (tokens unless named otherwise) and current load."""

    num_running: int
    num_waiting: int
    num_held: int
    kv_usage: float
    prefix_queries: int
    prefix_hits: int
    prompt_tokens: int
    generation_tokens: int
    forwarded_tokens: int
    preemptions: int
    steps: int
    expert_counts: tuple[tuple[int, ...], ...] = ()  # per layer, per expert (MoE only)
    num_waiting_tokens: int = 0  # prompt tokens queued for prefill (Scheduler.queued_...)
    histograms: tuple[tuple[str, HistogramSnapshot], ...] = ()  # (vLLM name, timings)
