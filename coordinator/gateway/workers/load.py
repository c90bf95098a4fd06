"""Worker load from `/metrics` (vLLM's names; the embedded engine serves the same).

`parse` is pure: Prometheus text in, `WorkerLoad` out. Both current and older vLLM names are
read (`vllm:kv_cache_usage_perc`, older `vllm:gpu_cache_usage_perc`); series with labels
(model_name, engine) are summed per metric.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

_NAMES = {
    "vllm:num_requests_running": "num_running",
    "vllm:num_requests_waiting": "num_waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:gpu_cache_usage_perc": "kv_usage",
    "vllm:prefix_cache_queries": "prefix_queries",
    "vllm:prefix_cache_hits": "prefix_hits",
    "vllm:num_preemptions": "preemptions",
    "vllm:prompt_tokens": "prompt_tokens",
    "vllm:generation_tokens": "generation_tokens",
}


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # 0..1
    prefix_queries: float = 0.0
    prefix_hits: float = 0.0
    preemptions: float = 0.0
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0


def parse(text: str) -> WorkerLoad:
    """Read the load figures from a worker's Prometheus exposition; missing ones stay 0.

    Raises ValueError on text that is not Prometheus exposition format."""
    sums: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            name = sample.name.removesuffix("_total")
            field = _NAMES.get(name)
            if field is None or sample.name.endswith(("_created", "_bucket")):
                continue
            sums[field] = sums.get(field, 0.0) + float(sample.value)
    return WorkerLoad(num_running=int(sums.get("num_running", 0)),
                      num_waiting=int(sums.get("num_waiting", 0)),
                      kv_usage=min(max(sums.get("kv_usage", 0.0), 0.0), 1.0),
                      prefix_queries=sums.get("prefix_queries", 0.0),
                      prefix_hits=sums.get("prefix_hits", 0.0),
                      preemptions=sums.get("preemptions", 0.0),
                      prompt_tokens=sums.get("prompt_tokens", 0.0),
                      generation_tokens=sums.get("generation_tokens", 0.0))
