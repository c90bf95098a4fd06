"""Write cluster/grafana/meshd.json, meshd's Grafana dashboard, from the panel list below.

    .venv/bin/python scripts/make_dashboard.py        # rewrite it
    .venv/bin/python scripts/make_dashboard.py --check  # exit 1 if the committed file differs

The dashboard reads the Prometheus datasource chosen at import (`DS_PROMETHEUS`); every
metric a panel queries is one meshd exports (tests/test_cluster_monitoring.py checks each
name against the gateway's, the coordinator's and the engine's own registries).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "cluster" / "grafana" / "meshd.json"
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


def q(name: str) -> str:
    """Quantiles of a gateway latency histogram (seconds)."""
    return f"sum by (le) (rate({name}_bucket[5m]))"


# (row title, [(panel title, unit, [(legend, PromQL)], panel type)])
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]], str]]]] = [
    ("Traffic and latency", [
        ("Requests by outcome", "reqps",
         [("{{outcome}}", "sum by (outcome) (rate(meshd_requests_total[1m]))")], "timeseries"),
        ("Time to first token", "s",
         [("p50", f"histogram_quantile(0.5, {q('meshd_ttft_seconds')})"),
          ("p95", f"histogram_quantile(0.95, {q('meshd_ttft_seconds')})"),
          ("p99", f"histogram_quantile(0.99, {q('meshd_ttft_seconds')})")], "timeseries"),
        ("Inter-token latency", "s",
         [("p50", f"histogram_quantile(0.5, {q('meshd_inter_token_seconds')})"),
          ("p95", f"histogram_quantile(0.95, {q('meshd_inter_token_seconds')})")],
         "timeseries"),
        ("End-to-end latency", "s",
         [("p50", f"histogram_quantile(0.5, {q('meshd_e2e_seconds')})"),
          ("p95", f"histogram_quantile(0.95, {q('meshd_e2e_seconds')})")], "timeseries"),
    ]),
    ("Disaggregation and cache", [
        ("Prefill: where prompts ran (P/D split)", "ops",
         [("{{mode}}", "sum by (mode) (rate(meshd_prefill_total[5m]))")], "timeseries"),
        ("Decode continuations", "ops",
         [("continued", "sum(rate(meshd_decode_continuations_total[5m]))")], "timeseries"),
        ("Prefix cache hit rate (tokens)", "percentunit",
         [("hit rate", "sum(rate(meshd_prefix_cache_hit_tokens_total[5m])) / "
                       "clamp_min(sum(rate(meshd_tenant_tokens_total{kind=\"prompt\"}[5m])), 1)")],
         "timeseries"),
        ("KV transfer bytes/s (decode pulls)", "Bps",
         [("pulled", "sum(rate(meshd_engine_kv_transfer_pulled_bytes_total[5m]))")],
         "timeseries"),
        ("KV transfer failures", "ops",
         [("{{code}}", "sum by (code) (rate(meshd_engine_kv_transfer_failures_total[5m]))"),
          ("local fallbacks", "sum(rate(meshd_engine_local_prefill_fallbacks_total[5m]))")],
         "timeseries"),
        ("Cache-routing health", "short",
         [("healthy (1) per replica", "min(meshd_cache_health_ok)"),
          ("{{issue}}", "sum by (issue) (meshd_cache_health_issues)")], "timeseries"),
    ]),
    ("Tenants", [
        ("Tokens by tenant", "short",
         [("{{tenant}} {{kind}}", "sum by (tenant, kind) (rate(meshd_tenant_tokens_total[5m]))")],
         "timeseries"),
        ("Spend by tenant (USD/h)", "currencyUSD",
         [("{{tenant}}", "sum by (tenant) (rate(meshd_tenant_spend_usd_total[1h])) * 3600")],
         "timeseries"),
        ("Admission by outcome", "ops",
         [("{{tenant}} {{outcome}}",
           "sum by (tenant, outcome) (rate(meshd_admission_total[5m]))")], "timeseries"),
        ("Reservations outstanding", "short",
         [("reservations", "sum(meshd_reservations_outstanding)")], "timeseries"),
    ]),
    ("Fleet", [
        ("Nodes by state", "short", [("{{state}}", "sum by (state) (meshd_nodes)")], "timeseries"),
        ("Heartbeat lag (p95)", "s",
         [("p95", "histogram_quantile(0.95, sum by (le) "
                  "(rate(meshd_heartbeat_lag_seconds_bucket[5m])))")], "timeseries"),
        ("Worker requests running / waiting", "short",
         [("running {{instance}}", "sum by (instance) (vllm:num_requests_running)"),
          ("waiting {{instance}}", "sum by (instance) (vllm:num_requests_waiting)")],
         "timeseries"),
        ("Worker KV cache usage", "percentunit",
         [("{{instance}}", "max by (instance) (vllm:kv_cache_usage_perc)")], "timeseries"),
        ("Gateway connections in flight", "short",
         [("in flight", "sum(meshd_gateway_in_flight)")], "timeseries"),
    ]),
    ("Trust", [
        ("Privacy decisions", "ops",
         [("{{decision}}", "sum by (decision) (rate(meshd_privacy_requests_total[5m]))")],
         "timeseries"),
        ("Receipts", "ops",
         [("{{outcome}}", "sum by (outcome) (rate(meshd_receipts_total[5m]))")], "timeseries"),
        ("Confidence halts", "ops",
         [("halted", "sum(rate(meshd_confidence_halts_total[5m]))")], "timeseries"),
    ]),
]


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for title, row in ROWS:
        panels.append({"id": pid, "type": "row", "title": title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y = pid + 1, y + 1
        for i, (ptitle, unit, exprs, kind) in enumerate(row):
            panels.append({
                "id": pid, "type": kind, "title": ptitle, "datasource": DS,
                "gridPos": {"h": 8, "w": 8, "x": 8 * (i % 3), "y": y + 8 * (i // 3)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [{"refId": chr(ord("A") + k), "datasource": DS, "expr": expr,
                             "legendFormat": legend} for k, (legend, expr) in enumerate(exprs)]})
            pid += 1
        y += 8 * (-(-len(row) // 3))
    return {
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource",
                      "pluginId": "prometheus", "pluginName": "Prometheus"}],
        "title": "meshd", "uid": "meshd-overview", "schemaVersion": 39, "version": 1,
        "editable": True, "time": {"from": "now-1h", "to": "now"}, "refresh": "30s",
        "tags": ["meshd", "llm", "inference"], "timezone": "utc", "panels": panels,
        "templating": {"list": []}, "annotations": {"list": []}}


def render() -> str:
    return json.dumps(dashboard(), indent=1, sort_keys=True) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.exists() and OUT.read_text() == text else 1)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
