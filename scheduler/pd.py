"""P/D decider: serve a request disaggregated (prefill elsewhere, KV moved) or colocated.

Disaggregating pays a KV transfer to keep long prefills off the decode worker's batch. It is
worth it only when the prefill the decode worker would have to do is long, and only when some
prefill worker has headroom to take it now.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from meshd.scheduler.types import RequestView, Role, WorkerView


@dataclass(frozen=True, slots=True)
class PDConfig:
    min_uncached_tokens: int = 512  # shorter local prefills stay colocated
    colocate_cached_fraction: float = 0.8  # decode worker caches this much of the prompt: stay
    prefill_max_waiting: int = 8  # a prefill worker with more queued has no headroom
    prefill_max_kv_usage: float = 0.95

    def __post_init__(self) -> None:
        if self.min_uncached_tokens < 0:
            raise ValueError("pd.min_uncached_tokens: must be >= 0")
        if not 0.0 <= self.colocate_cached_fraction <= 1.0:
            raise ValueError("pd.colocate_cached_fraction: must be in [0, 1]")


class PDChoice(NamedTuple):
    disaggregate: bool
    reason: str  # stable code: short_prefill | decode_cached | no_prefill_headroom | long_prefill


class PDDecider:
    def __init__(self, config: PDConfig | None = None) -> None:
        self.config = config or PDConfig()

    def decide(self, request: RequestView, decode: WorkerView,
               workers: Sequence[WorkerView]) -> PDChoice:
        """`decode` is the chosen decode worker; `workers` the pool (filtered here to healthy
        prefill-capable workers of the model, other than `decode`)."""
        cfg = self.config
        n = request.num_prompt_tokens
        cached = request.cached_tokens(decode.worker_id, decode.block_size)
        if n > 0 and cached >= cfg.colocate_cached_fraction * n:
            return PDChoice(False, "decode_cached")
        if n - cached < cfg.min_uncached_tokens:
            return PDChoice(False, "short_prefill")
        for w in workers:
            if (w.healthy and w.role is not Role.DECODE and w.model == request.model
                    and w.worker_id != decode.worker_id
                    and w.num_waiting <= cfg.prefill_max_waiting
                    and w.kv_usage <= cfg.prefill_max_kv_usage):
                return PDChoice(True, "long_prefill")
        return PDChoice(False, "no_prefill_headroom")
