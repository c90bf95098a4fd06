"""Prometheus text exposition for the worker server: vLLM's names plus meshd's own.

vLLM's metrics come from `prometheus_client`, whose counters are exposed with a `_total`
suffix (`vllm:prompt_tokens_total`), gauges as named (`vllm:num_requests_running`); all carry
`model_name` and `engine` labels. meshd's own metrics use the `meshd_engine_` prefix. Rendering
is a pure function of snapshots, so it never touches the engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshd.kv_transfer.leases import LeaseStats
from meshd.node_agent.engine.async_engine import DriverStats
from meshd.node_agent.engine.disagg import DisaggStats
from meshd.node_agent.engine.timings import HistogramSnapshot


@dataclass(frozen=True, slots=True)
class ServerSnapshot:
    """Everything /metrics shows besides the engine: transfer, leases, events."""

    leases_held: int
    leases: LeaseStats  # a copy (LeaseTable.stats())
    kv_server: Mapping[str, Any]  # ServerStats.snapshot() of the prefill-side server
    events_published: int
    events_dropped: int
    lease_quota: Mapping[str, Any] = field(default_factory=dict)  # LeaseQuota.snapshot()


_HISTOGRAM_DOCS = {
    "vllm:request_prefill_time_seconds": "Histogram of time spent in PREFILL phase for request.",
    "vllm:request_prompt_tokens": "Number of prefill tokens processed.",
    "vllm:inter_token_latency_seconds": "Histogram of inter-token latency in seconds.",
}


def _labels(base: Mapping[str, str], extra: Mapping[str, str] | None = None) -> str:
    items = {**base, **(extra or {})}
    inner = ",".join(f'{k}="{v}"' for k, v in items.items())
    return "{" + inner + "}"


class _Writer:
    def __init__(self, base: Mapping[str, str]) -> None:
        self.base = base
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, doc: str,
               samples: Iterable[tuple[Mapping[str, str] | None, float]]) -> None:
        self.lines.append(f"# HELP {name} {doc}")
        self.lines.append(f"# TYPE {name} {kind}")
        sample = f"{name}_total" if kind == "counter" else name
        for extra, value in samples:
            self.lines.append(f"{sample}{_labels(self.base, extra)} {float(value)!r}")

    def one(self, name: str, kind: str, doc: str, value: float) -> None:
        self.metric(name, kind, doc, [(None, value)])

    def histogram(self, name: str, doc: str, h: HistogramSnapshot) -> None:
        self.lines.append(f"# HELP {name} {doc}")
        self.lines.append(f"# TYPE {name} histogram")
        total = 0
        bounds = [repr(float(b)) for b in h.bounds] + ["+Inf"]
        for le, n in zip(bounds, h.counts, strict=True):
            total += n
            self.lines.append(f"{name}_bucket{_labels(self.base, {'le': le})} {float(total)!r}")
        self.lines.append(f"{name}_sum{_labels(self.base)} {float(h.sum)!r}")
        self.lines.append(f"{name}_count{_labels(self.base)} {float(h.observations)!r}")


def render(model_name: str, d: DriverStats, t: DisaggStats, s: ServerSnapshot) -> str:
    """The /metrics body."""
    e = d.engine
    w = _Writer({"model_name": model_name, "engine": "0"})
    w.one("vllm:num_requests_running", "gauge", "Requests in model execution batches.",
          e.num_running)
    w.one("vllm:num_requests_waiting", "gauge", "Requests waiting to be processed.",
          e.num_waiting)
    w.one("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
          e.kv_usage)
    w.one("meshd_engine_queued_prefill_tokens", "gauge",
          "Prompt tokens queued for prefill: waiting prompts plus the rest of those being "
          "prefilled.", e.num_waiting_tokens)
    w.one("vllm:prefix_cache_queries", "counter",
          "Prefix cache queries, in terms of number of queried tokens.", e.prefix_queries)
    w.one("vllm:prefix_cache_hits", "counter",
          "Prefix cache hits, in terms of number of cached tokens.", e.prefix_hits)
    w.one("vllm:num_preemptions", "counter", "Cumulative number of preemption from the engine.",
          e.preemptions)
    w.one("vllm:prompt_tokens", "counter", "Number of prefill tokens processed.",
          e.prompt_tokens)
    w.one("vllm:generation_tokens", "counter", "Number of generation tokens processed.",
          e.generation_tokens)
    w.one("meshd_engine_kv_blocks", "gauge", "KV cache blocks in total.", d.num_blocks)
    w.one("meshd_engine_kv_blocks_free", "gauge", "KV cache blocks allocatable now.",
          d.free_blocks)
    w.one("meshd_engine_forwarded_tokens", "counter", "Tokens run through the model.",
          e.forwarded_tokens)
    w.one("meshd_engine_aborts", "counter", "Requests aborted (cancel, disconnect).", d.aborts)
    for name, h in e.histograms:
        w.histogram(name, _HISTOGRAM_DOCS.get(name, name), h)
    if e.expert_counts:
        w.metric("meshd_engine_moe_expert_tokens", "counter",
                 "Tokens routed to each expert, per layer.",
                 [({"layer": str(li), "expert": str(ei)}, c)
                  for li, row in enumerate(e.expert_counts) for ei, c in enumerate(row)])
    with t.lock:
        pulled, secs, ok = t.pulled_bytes, t.pull_seconds, t.pulls_ok
        failures, fallbacks = dict(t.pull_failures), dict(t.fallbacks)
        by_transport = dict(t.pulls_by_transport)
    w.one("meshd_engine_kv_transfer_pulled_bytes", "counter", "KV bytes pulled from prefill.",
          pulled)
    w.one("meshd_engine_kv_transfer_pull_seconds", "counter", "Seconds spent pulling KV.", secs)
    w.one("meshd_engine_kv_transfer_pulls", "counter", "Successful KV pulls.", ok)
    w.metric("meshd_engine_kv_transfer_pulls_by_transport", "counter",
             "Successful KV pulls, by the transport they used.",
             [({"transport": k}, v) for k, v in sorted(by_transport.items())])
    w.metric("meshd_engine_kv_transfer_failures", "counter", "Failed KV pulls, by error code.",
             [({"code": k}, v) for k, v in sorted(failures.items())])
    w.metric("meshd_engine_local_prefill_fallbacks", "counter",
             "Decode requests prefilled locally instead of importing KV, by reason.",
             [({"reason": k}, v) for k, v in sorted(fallbacks.items())])
    kv = s.kv_server
    w.one("meshd_engine_kv_transfer_served_bytes", "counter", "KV bytes served to decode.",
          float(kv.get("bytes_sent", 0)))
    w.one("meshd_engine_kv_transfer_served", "counter", "Transfers served and acknowledged.",
          float(kv.get("served", 0)))
    served_fail = kv.get("failures", {})
    w.metric("meshd_engine_kv_transfer_serve_failures", "counter",
             "Failed transfers on the serving side, by error code.",
             [({"code": k}, v) for k, v in sorted(served_fail.items())])
    w.one("meshd_engine_kv_leases_held", "gauge", "Prefill block leases held now.",
          s.leases_held)
    w.one("meshd_engine_kv_leases_granted", "counter", "Prefill block leases granted.",
          s.leases.granted)
    w.one("meshd_engine_kv_leases_sent", "counter", "Leases ended by a confirmed pull.",
          s.leases.sent)
    w.one("meshd_engine_kv_leases_expired", "counter", "Leases freed by timeout.",
          s.leases.expired)
    q = s.lease_quota
    if q:
        w.one("meshd_engine_kv_leased_blocks", "gauge",
              "Blocks held or reserved for decode peers now.", float(q["blocks"]))
        w.one("meshd_engine_kv_leased_blocks_bound", "gauge",
              "Bound on the blocks held for decode peers, in all.", float(q["max_blocks"]))
        w.metric("meshd_engine_kv_lease_refusals", "counter",
                 "Prefills refused (429) at a lease bound, by bound.",
                 [({"bound": k}, v) for k, v in sorted(q["refused"].items())])
    w.one("meshd_engine_kv_events_published", "counter", "KV event batches published.",
          s.events_published)
    w.one("meshd_engine_kv_events_dropped", "counter", "KV event batches dropped.",
          s.events_dropped)
    return "\n".join(w.lines) + "\n"
