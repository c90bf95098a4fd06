"""The MoE scenario: requests that carry expert statistics, and the expert hit rate.

Live, a prefill answer carries the prompt's expert statistics (`meshd.experts`: expert id ->
prompt tokens routed there, summed over layers) and the gateway re-makes the decode pick with
them, so the expert-affinity scorer steers decode to the worker hosting most of them. In the
simulator a `TraceRequest` carries them from arrival (`experts`), and `ClusterConfig.experts`
says which worker hosts which experts.

- `moe_trace` makes a synthetic workload: requests on `topics`, each topic routing its tokens
  mostly to its own few experts (a skewed Dirichlet-like mix), Poisson arrivals;
- `best_workers` names the workers hosting the largest share of a request's expert tokens;
- `expert_hits` is the figure of merit: the fraction of decoded MoE requests whose decode
  worker is one of their best workers (the live benchmark, `benchmarks/moe_routing.py`, uses
  the same definition).

The timing model has no cost for an expert miss; the scenario measures where requests go.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from meshd.scheduler.sim.cluster import ClusterConfig
from meshd.scheduler.sim.sim import SimResult
from meshd.scheduler.sim.trace import TraceRequest


def best_workers(experts: Mapping[int, int], hosted: Mapping[str, frozenset[int]]
                 ) -> frozenset[str]:
    """The workers in `hosted` whose experts take the most of `experts`' tokens (an empty set
    hosts all). Empty when `experts` has no tokens."""
    if sum(experts.values()) <= 0 or not hosted:
        return frozenset()
    share = {w: sum(n for e, n in experts.items() if not hs or e in hs)
             for w, hs in hosted.items()}
    top = max(share.values())
    return frozenset(w for w, s in share.items() if s == top)


class ExpertHits(NamedTuple):
    hits: int
    requests: int  # decoded requests with expert statistics

    @property
    def rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0


def expert_hits(result: SimResult, trace: Sequence[TraceRequest], cluster: ClusterConfig
                ) -> ExpertHits:
    """How many decoded MoE requests were decoded on one of their `best_workers` (among the
    decode-capable workers)."""
    ids = cluster.worker_ids()
    experts: tuple[frozenset[int], ...] = cluster.experts or (frozenset(),) * len(ids)
    hosted = {w: e for w, e, r in zip(ids, experts, cluster.roles, strict=True)
              if r.can_decode()}
    hits = n = 0
    for rec, req in zip(result.records, trace, strict=True):
        if not req.experts or not rec.decode_worker or rec.dropped:
            continue
        n += 1
        hits += rec.decode_worker in best_workers(dict(req.experts), hosted)
    return ExpertHits(hits, n)


def moe_trace(n: int, rate_rps: float, num_experts: int = 8, topics: int = 4,
              hot_experts: int = 2, hot_share: float = 0.8, prompt_tokens: tuple[int, int] =
              (256, 4096), output_tokens: tuple[int, int] = (16, 256), top_k: int = 2,
              topic_weights: Sequence[float] | None = None, seed: int = 0
              ) -> list[TraceRequest]:
    """`n` requests arriving at `rate_rps` (Poisson), each on a topic drawn uniformly (or by
    `topic_weights`). Topic t's hot experts are `hot_experts` ids starting at
    `t * num_experts // topics`; a request of topic t routes `hot_share` of its
    `prompt * top_k` expert tokens to them (evenly) and the rest evenly to the others.
    Prompts have unique prefixes (no `hash_ids`): the scenario isolates expert affinity."""
    if n < 0 or rate_rps <= 0 or not 1 <= hot_experts <= num_experts or topics < 1:
        raise ValueError("moe_trace: need n >= 0, rate > 0, 1 <= hot_experts <= num_experts")
    if topic_weights is not None and len(topic_weights) != topics:
        raise ValueError(f"moe_trace: topic_weights needs {topics} weights")
    rng = random.Random(seed)
    t = 0.0
    out = []
    for i in range(n):
        t += rng.expovariate(rate_rps)
        topic = (rng.randrange(topics) if topic_weights is None
                 else rng.choices(range(topics), topic_weights)[0])
        first = topic * num_experts // topics
        hot = [(first + k) % num_experts for k in range(hot_experts)]
        prompt = rng.randint(*prompt_tokens)
        routed = prompt * top_k
        cold = [e for e in range(num_experts) if e not in hot]
        counts = dict.fromkeys(range(num_experts), 0)
        for e in hot:
            counts[e] += int(routed * hot_share) // len(hot)
        rest = routed - sum(counts.values())
        for j, e in enumerate(cold or hot):
            counts[e] += rest // len(cold or hot) + (j < rest % len(cold or hot))
        experts = tuple((e, c) for e, c in sorted(counts.items()) if c > 0)
        out.append(TraceRequest(f"moe-{i}", t, prompt, rng.randint(*output_tokens),
                                experts=experts))
    return out
