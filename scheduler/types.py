"""Typed contracts between the scheduler and its callers (gateway, simulator).

Everything here is plain data: the gateway and the simulator build these views from their own
state (live worker metrics and KV events, or the simulated cluster) and the same policy code
decides in both. Nothing here does I/O or imports ray, grpc, torch or sockets.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol


class Role(enum.Enum):
    """What a worker may do in disaggregated serving."""

    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"

    def can_prefill(self) -> bool:
        return self is not Role.DECODE

    def can_decode(self) -> bool:
        return self is not Role.PREFILL


@dataclass(frozen=True, slots=True)
class WorkerView:
    """One worker as the scheduler sees it at decision time.

    Load figures come from the worker's `/metrics` (vLLM names) or the simulator; `cost` holds
    the per-worker cost model parameters the SLO scorer uses (empty: defaults).
    `num_waiting_tokens` is the prefill work queued on the worker, in prompt tokens: the whole
    prompts of waiting requests plus the not yet computed rest of those being prefilled; 0 means
    none or not reported (scorers then fall back to the request counts).
    """

    worker_id: str
    role: Role
    model: str
    healthy: bool = True
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # 0..1, vLLM `kv_cache_usage_perc`
    kv_capacity_blocks: int = 0
    block_size: int = 16
    node_id: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    experts: frozenset[int] = frozenset()  # MoE experts hosted (empty: all / not MoE)
    cost: Mapping[str, float] = field(default_factory=dict)
    num_waiting_tokens: int = 0


@dataclass(frozen=True, slots=True)
class RequestView:
    """One request as the scheduler sees it: computed once at the gateway edge."""

    request_id: str
    model: str
    num_prompt_tokens: int
    block_hashes: Sequence[int]  # chained hashes of the prompt's full blocks (see block_hash)
    max_tokens: int = 16
    experts: Mapping[int, int] = field(default_factory=dict)  # expert id -> tokens routed
    attributes: Mapping[str, str] = field(default_factory=dict)  # tenant, privacy class, ...
    # Per-request routing state, filled once per request by the Router from the global prefix
    # index (or by the simulator from its own): worker id -> number of leading `block_hashes`
    # that worker already caches. Absent workers hold none. Plugins read it, never mutate it.
    cached_blocks: Mapping[str, int] = field(default_factory=dict)
    token_ids: Sequence[int] = ()  # optional prompt tokens (approximate baselines only)
    # The client's cache hint (Anthropic `cache_control`): the leading prompt tokens it marked
    # as the prefix it will send again; prefix locality is judged on them (0: the whole prompt)
    cache_hint_tokens: int = 0

    def with_cached_blocks(self, cached_blocks: Mapping[str, int]) -> RequestView:
        """This request with `cached_blocks` replaced (`dataclasses.replace`, without its
        per-call field introspection: this runs once per routed request)."""
        return RequestView(self.request_id, self.model, self.num_prompt_tokens, self.block_hashes,
                           self.max_tokens, self.experts, self.attributes, cached_blocks,
                           self.token_ids, self.cache_hint_tokens)

    def cached_tokens(self, worker_id: str, block_size: int) -> int:
        """Prompt tokens `worker_id` needs not prefill (matched full blocks, capped)."""
        return min(self.cached_blocks.get(worker_id, 0) * block_size, self.num_prompt_tokens)


class Decision(NamedTuple):
    """The scheduler's answer: where to prefill and where to decode.

    `prefill` equals `decode` when the request is served colocated (local prefill).
    `cached_tokens` is the prefix the chosen prefill worker already holds. The scores are the
    selectors' weighted totals of the candidates they scored (traces name the best few;
    None: the selector gave none).
    """

    prefill: str
    decode: str
    disaggregated: bool
    cached_tokens: int
    decode_scores: Mapping[str, float] | None = None
    prefill_scores: Mapping[str, float] | None = None


class NoWorkerAvailable(Exception):
    """No worker passed the filters for a request; the gateway answers with a 503-style error."""


class Filter(Protocol):
    """Drops workers that cannot serve the request. Must not mutate its inputs.

    Optional: `request_key(request) -> Hashable`. A filter that has it declares that its output
    is a pure function of the worker views and that key (no clock, no state), so a profile may
    reuse an earlier output for the same views and key instead of calling `filter` again.
    """

    name: str

    def filter(self, request: RequestView, workers: Sequence[WorkerView]) -> list[WorkerView]: ...


class Scorer(Protocol):
    """Scores each worker in [0, 1] (higher is better); the framework clamps and weighs.

    Optional: `upper_bound(worker) -> float`, a bound on the worker's score for every request
    with `num_prompt_tokens >= 0` that has no entry for the worker in `cached_blocks`. A profile
    whose scorers all have it (and whose picker takes the maximum) scores only the cached
    workers and a shortlist of the best-bounded others, falling back to all when a skipped
    worker could still win. Bounds must be computed with the same float operations as `score`.
    """

    name: str

    def score(self, request: RequestView, workers: Sequence[WorkerView]) -> dict[str, float]: ...


class Picker(Protocol):
    """Picks one worker id from weighted total scores (non-empty).

    Optional: `picks_max = True` declares the pick is the highest total (ties to the smallest
    id) whatever other candidates are present, which lets a profile prune candidates.
    """

    name: str

    def pick(self, request: RequestView, scores: Mapping[str, float]) -> str: ...
