"""P/D decider: serve a request disaggregated (prefill elsewhere, KV moved) or colocated.

Disaggregating pays a KV transfer, and splits the request's prefix between two caches, to keep
a long prefill off the decode worker. It is worth it only when the prefill the decode worker
would have to do is long, and only when another worker can start that prefill sooner:

* a dedicated prefill worker (role `PREFILL`) with headroom (few waiting, KV not full): that is
  what the pool is for;
* a shared worker (role `BOTH`) only when its queued prefill (`WorkerView.num_waiting_tokens`)
  is at least `shared_queue_gap_tokens` shorter than the decode worker's, i.e. the request would
  otherwise wait that much longer behind other prompts. Without queued-token figures (0) a shared
  worker never qualifies, so an all-`BOTH` cluster stays colocated unless a worker is backed up.
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
    shared_queue_gap_tokens: int = 16384  # a BOTH worker must have this much less queued

    def __post_init__(self) -> None:
        if self.min_uncached_tokens < 0:
            raise ValueError("pd.min_uncached_tokens: must be >= 0")
        if not 0.0 <= self.colocate_cached_fraction <= 1.0:
            raise ValueError("pd.colocate_cached_fraction: must be in [0, 1]")
        if self.shared_queue_gap_tokens <= 0:
            raise ValueError("pd.shared_queue_gap_tokens: must be > 0")


class PDChoice(NamedTuple):
    disaggregate: bool
    # stable code: short_prefill | decode_cached | no_full_block | no_prefill_headroom |
    # decode_not_backed_up
    # (colocated); long_prefill (a dedicated prefill worker) | decode_backed_up (a shared one)
    reason: str


class PDDecider:
    def __init__(self, config: PDConfig | None = None) -> None:
        self.config = config or PDConfig()

    def decide(self, request: RequestView, decode: WorkerView,
               workers: Sequence[WorkerView]) -> PDChoice:
        """`decode` is the chosen decode worker; `workers` the pool (filtered here to healthy
        prefill-capable workers of the model with headroom, other than `decode`)."""
        cfg = self.config
        n = request.num_prompt_tokens
        cached = request.cached_tokens(decode.worker_id, decode.block_size)
        if n > 0 and cached >= cfg.colocate_cached_fraction * n:
            return PDChoice(False, "decode_cached")
        if n - 1 < decode.block_size:  # no full block would be transferred (the last prompt
            return PDChoice(False, "no_full_block")  # token is always computed by decode)
        if n - cached < cfg.min_uncached_tokens:
            return PDChoice(False, "short_prefill")
        shared = False  # a BOTH worker with headroom exists
        for w in workers:
            if (w.healthy and w.role is not Role.DECODE and w.model == request.model
                    and w.worker_id != decode.worker_id
                    and w.num_waiting <= cfg.prefill_max_waiting
                    and w.kv_usage <= cfg.prefill_max_kv_usage):
                if w.role is Role.PREFILL:
                    return PDChoice(True, "long_prefill")
                if w.num_waiting_tokens + cfg.shared_queue_gap_tokens <= decode.num_waiting_tokens:
                    return PDChoice(True, "decode_backed_up")
                shared = True
        return PDChoice(False, "decode_not_backed_up" if shared else "no_prefill_headroom")
