"""Worker load from `/metrics` (vLLM's names; the embedded engine serves the same).

`parse` is pure: Prometheus text in, `WorkerLoad` out. Both current and older vLLM names are
read (`vllm:kv_cache_usage_perc`, older `vllm:gpu_cache_usage_perc`); series with labels
(model_name, engine) are summed per metric.

Queued prefill tokens: vLLM exports no such gauge — its Prometheus logger
(`vllm/v1/metrics/loggers.py`, `PrometheusStatLogger.record`) sets only
`vllm:num_requests_running`, `vllm:num_requests_waiting` and `vllm:kv_cache_usage_perc` from
`SchedulerStats` (`vllm/v1/metrics/stats.py`: request counts, KV usage, prefix-cache and spec
decode stats, no token count). The embedded engine exports `meshd_engine_queued_prefill_tokens`;
`num_waiting_tokens` is None where a worker does not, and the pool keeps its own estimate.

The histograms' `_sum`/`_count` (prefill time, prompt tokens, inter-token latency) feed the cost
calibration (`calibration.py`).
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
    "meshd_engine_queued_prefill_tokens": "num_waiting_tokens",
    "vllm:request_prefill_time_seconds_sum": "prefill_s_sum",
    "vllm:request_prefill_time_seconds_count": "prefill_count",
    "vllm:request_prompt_tokens_sum": "request_prompt_tokens_sum",
    "vllm:inter_token_latency_seconds_sum": "itl_s_sum",
    "vllm:inter_token_latency_seconds_count": "itl_count",
    # before vLLM 0.11 this histogram held the inter-token gaps (now a per-request mean)
    "vllm:time_per_output_token_seconds_sum": "tpot_s_sum",
    "vllm:time_per_output_token_seconds_count": "tpot_count",
}
_SKIP = ("_created", "_bucket")


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """One scrape. Counters and histogram sums are cumulative since the worker started;
    `num_waiting_tokens` is None when the worker exports no queued-token gauge."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # 0..1
    prefix_queries: float = 0.0
    prefix_hits: float = 0.0
    preemptions: float = 0.0
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    num_waiting_tokens: int | None = None
    prefill_s_sum: float = 0.0
    prefill_count: float = 0.0
    request_prompt_tokens_sum: float = 0.0
    itl_s_sum: float = 0.0  # inter-token gaps (vLLM >= 0.11 name, else the older one)
    itl_count: float = 0.0


def parse(text: str) -> WorkerLoad:
    """Read the load figures from a worker's Prometheus exposition; missing ones stay 0.

    Raises ValueError on text that is not Prometheus exposition format."""
    sums: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            name = sample.name.removesuffix("_total")
            field = _NAMES.get(name)
            if field is None or sample.name.endswith(_SKIP):
                continue
            sums[field] = sums.get(field, 0.0) + float(sample.value)
    g = sums.get
    queued = g("num_waiting_tokens")
    itl = ("itl_s_sum", "itl_count") if "itl_count" in sums else ("tpot_s_sum", "tpot_count")
    return WorkerLoad(num_running=int(g("num_running", 0)), num_waiting=int(g("num_waiting", 0)),
                      kv_usage=min(max(g("kv_usage", 0.0), 0.0), 1.0),
                      prefix_queries=g("prefix_queries", 0.0),
                      prefix_hits=g("prefix_hits", 0.0), preemptions=g("preemptions", 0.0),
                      prompt_tokens=g("prompt_tokens", 0.0),
                      generation_tokens=g("generation_tokens", 0.0),
                      num_waiting_tokens=None if queued is None else max(int(queued), 0),
                      prefill_s_sum=g("prefill_s_sum", 0.0),
                      prefill_count=g("prefill_count", 0.0),
                      request_prompt_tokens_sum=g("request_prompt_tokens_sum", 0.0),
                      itl_s_sum=g(itl[0], 0.0), itl_count=g(itl[1], 0.0))
