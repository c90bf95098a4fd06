"""MoE helpers over real engine processes (tests and `benchmarks/moe_routing.py`).

`probe(engine, prompt)` asks a worker directly which experts a prompt's tokens are routed to:
the rise of its `meshd_engine_moe_expert_tokens` counters (every layer, every expert) over one
`max_tokens=1` completion, and the top experts its answer reports (`meshd.experts`, what a
prefill answer gives the gateway). The prompt must be new to that worker (a prefix-cache hit is
not computed, so not counted). `members` gives a mesh its expert placement as the registry would
(one `Experts` record per layer for each worker with a set); `generated` reads a worker's
output-token counter, from which a test tells which decode worker served a request.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.request
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from meshd.capabilities import Experts, Member
from support.mesh import EngineProc

MODEL = "meshd-tiny-moe"
LAYERS = 4  # node_agent.engine.config.tiny_moe_model()
MOE_FLAGS = ("--moe", "--model-name", MODEL)


def _metrics(e: EngineProc) -> str:
    with urllib.request.urlopen(e.url + "/metrics", timeout=10) as r:
        return r.read().decode()


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.labels, s.value) for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == name]


def expert_tokens(e: EngineProc) -> dict[int, int]:
    """Tokens routed to each expert since start, summed over layers."""
    out: dict[int, int] = {}
    for labels, v in _samples(_metrics(e), "meshd_engine_moe_expert_tokens_total"):
        out[int(labels["expert"])] = out.get(int(labels["expert"]), 0) + int(v)
    return out


def generated(e: EngineProc) -> float:
    return sum(v for _, v in _samples(_metrics(e), "vllm:generation_tokens_total"))


class Probe(NamedTuple):
    activated: dict[int, int]  # expert -> prompt tokens routed there, over all layers
    reported: dict[int, int]  # the answer's `meshd.experts`: its top experts -> tokens


def probe(e: EngineProc, prompt: str) -> Probe:
    """Which experts `prompt` activates, measured on `e` (the prompt must be new to it)."""
    before = expert_tokens(e)
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 1,
                       "temperature": 0}).encode()
    req = urllib.request.Request(e.url + "/v1/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        answer = json.loads(r.read())
    after = expert_tokens(e)
    return Probe({k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)},
                 {int(k): int(n) for k, n in answer["meshd"]["experts"].items()})


def share(experts: Mapping[int, int], hosted: frozenset[int]) -> float:
    total = sum(experts.values())
    return sum(n for k, n in experts.items() if k in hosted) / total if total else 0.0


def members(engines: Sequence[EngineProc], placement: Mapping[str, frozenset[int]]
            ) -> list[Member]:
    """The engines as routing-set members of node "n-moe", `placement[worker_id]` hosted in
    every layer (absent: hosts all)."""
    out = []
    for e in engines:
        w = dataclasses.replace(e.worker, model=MODEL)  # start_engine names the dense model
        hosted = placement.get(w.worker_id)
        records = () if hosted is None else tuple(
            Experts(MODEL, w.worker_id, layer, tuple(sorted(hosted))) for layer in range(LAYERS))
        out.append(Member("n-moe", w, {"zone": "test"}, records))
    return out
