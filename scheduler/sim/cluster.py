"""Cluster shape for a simulation: workers, roles, cache sizes, cost model, batching limits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from meshd.scheduler.sim.cache import BlockCache
from meshd.scheduler.sim.engine import SimWorker
from meshd.scheduler.sim.timing import EngineTiming, h100_llama3_8b
from meshd.scheduler.sim.trace import TRACE_BLOCK_TOKENS
from meshd.scheduler.types import Role, WorkerView
from meshd.scheduler.views import LoadSample, WorkerFacts, build_view

# H100 80 GB with 16 GB of Llama-3-8B weights and ~12 GB activations/overheads leaves ~52 GB of
# KV: 52e9 / 131072 bytes per token ~ 400k tokens.
DEFAULT_KV_TOKENS = 400_000


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """`roles[i]` is worker i's role; ids are `w00`, `w01`, ... (sorted = index order).

    `block_size` is the cache granularity in tokens (must divide 512, see `trace.block_hashes`);
    `kv_tokens` each worker's KV capacity in HBM; `host_cache_tokens` extra prefix-cache room per
    worker in a host-memory tier (evicted prefixes stay matchable); `token_budget` the tokens one
    mixed iteration may process (vLLM `max_num_batched_tokens`); `max_num_seqs` the running-batch
    limit; `experts[i]` the MoE experts worker i hosts (empty set or `()`: all), which only the
    expert-affinity scorer reads (the timing model has no cost for a miss).
    """

    roles: tuple[Role, ...]
    cost: EngineTiming = field(default_factory=h100_llama3_8b)
    block_size: int = TRACE_BLOCK_TOKENS
    kv_tokens: int = DEFAULT_KV_TOKENS
    host_cache_tokens: int = 0
    token_budget: int = 8192
    max_num_seqs: int = 256
    max_chunk_steps: int = 1024
    model: str = "llama-3-8b"
    experts: tuple[frozenset[int], ...] = ()  # per worker: MoE experts hosted (() = all)

    def __post_init__(self) -> None:
        if not self.roles:
            raise ValueError("cluster.roles: need at least one worker")
        if not any(r.can_prefill() for r in self.roles):
            raise ValueError("cluster.roles: need a worker that can prefill")
        if not any(r.can_decode() for r in self.roles):
            raise ValueError("cluster.roles: need a worker that can decode")
        if self.block_size <= 0 or TRACE_BLOCK_TOKENS % self.block_size:
            raise ValueError(f"cluster.block_size: must divide 512, got {self.block_size}")
        if self.kv_tokens < self.block_size:
            raise ValueError("cluster.kv_tokens: must hold at least one block")
        if self.host_cache_tokens < 0:
            raise ValueError("cluster.host_cache_tokens: must be >= 0")
        for name in ("token_budget", "max_num_seqs", "max_chunk_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"cluster.{name}: must be > 0")
        if self.experts and len(self.experts) != len(self.roles):
            raise ValueError(f"cluster.experts: one set per worker ({len(self.roles)}), got "
                             f"{len(self.experts)}")

    @staticmethod
    def colocated(n: int, **kw: object) -> ClusterConfig:
        """`n` workers that prefill and decode."""
        return ClusterConfig(roles=(Role.BOTH,) * n, **kw)  # type: ignore[arg-type]

    @staticmethod
    def disaggregated(n_prefill: int, n_decode: int, **kw: object) -> ClusterConfig:
        """`n_prefill` prefill-only workers followed by `n_decode` decode-only workers."""
        roles = (Role.PREFILL,) * n_prefill + (Role.DECODE,) * n_decode
        return ClusterConfig(roles=roles, **kw)  # type: ignore[arg-type]

    @property
    def capacity_blocks(self) -> int:
        return self.kv_tokens // self.block_size

    def worker_ids(self) -> list[str]:
        return [f"w{i:02d}" for i in range(len(self.roles))]

    def build(self) -> list[SimWorker]:
        cache_blocks = (self.kv_tokens + self.host_cache_tokens) // self.block_size
        return [SimWorker(wid, role, BlockCache(self.capacity_blocks, self.block_size,
                                                cache_blocks),
                          self.cost, self.token_budget, self.max_num_seqs, self.max_chunk_steps)
                for wid, role in zip(self.worker_ids(), self.roles, strict=True)]


def worker_facts(cluster: ClusterConfig, workers: Sequence[SimWorker],
                 cost: Mapping[str, float]) -> list[WorkerFacts]:
    """The static part of each worker's view (built once per run; `cost` shared)."""
    experts = cluster.experts or (frozenset(),) * len(workers)
    return [WorkerFacts(worker_id=w.worker_id, role=w.role, model=cluster.model,
                        block_size=w.cache.block_size, kv_capacity_blocks=w.cache.capacity,
                        experts=e, cost=cost)
            for w, e in zip(workers, experts, strict=True)]


def worker_view(facts: WorkerFacts, w: SimWorker) -> WorkerView:
    """The `WorkerView` a scrape of `w`'s metrics would give the scheduler now."""
    running, waiting = w.load()
    return build_view(facts, LoadSample(running, waiting, w.queued_tokens, w.cache.usage()))


def views(facts: Sequence[WorkerFacts], workers: Sequence[SimWorker]) -> list[WorkerView]:
    return [worker_view(f, w) for f, w in zip(facts, workers, strict=True)]
