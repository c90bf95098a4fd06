"""The fleet `/metrics` merge: replicas' expositions in, one exposition out (pure)."""

from __future__ import annotations

import math

import pytest
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families

from meshd.coordinator.gateway.config import GatewayConfig
from meshd.coordinator.gateway.http.fleet_metrics import (
    GAUGES,
    UNKNOWN_GAUGE,
    Combine,
    Reply,
    fleet_exposition,
    merge,
    parse,
    rule,
)
from meshd.coordinator.gateway.runtime import GatewayRuntime

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def make_samples(text: str | bytes) -> Samples:
    raw = text.decode() if isinstance(text, bytes) else text
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(raw) for s in fam.samples}


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


def merged(*texts: str) -> Samples:
    out = fleet_exposition([Reply(i, f"h:{i}", t) for i, t in enumerate(texts)], len(texts))
    types = [line.split()[2] for line in out.decode().splitlines()
             if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), out  # each name declared once: a valid exposition
    return make_samples(out)


RULES = [  # (family, parser type, rule)
    ("meshd_requests", "counter", Combine.SUM),
    ("meshd_e2e_seconds", "histogram", Combine.SUM),
    ("meshd_rpc_seconds", "summary", Combine.SUM),
    ("meshd_gateway_connections", "gauge", Combine.SUM),
    ("meshd_gateway_in_flight", "gauge", Combine.SUM),
    ("meshd_kv_transfer_bytes", "gauge", Combine.MAX),
    ("meshd_kv_transfer_seconds", "gauge", Combine.MAX),
    ("meshd_kv_transfer_failures", "gauge", Combine.MAX),
    ("meshd_kv_transfer_local_fallbacks", "gauge", Combine.MAX),
    ("meshd_kv_lease_blocks_held", "gauge", Combine.MAX),
    ("meshd_cache_health_ok", "gauge", Combine.MIN),
    ("meshd_cache_health_issues", "gauge", Combine.MAX),
    ("meshd_cache_health_event_age_seconds", "gauge", Combine.MAX),
    ("meshd_requests_created", "gauge", Combine.MIN),
    ("meshd_something_new", "gauge", Combine.MAX),
    ("meshd_something_untyped", "unknown", Combine.MAX),
]


@pytest.mark.parametrize(("name", "typ", "want"), RULES)
def test_rule_table(name: str, typ: str, want: Combine) -> None:
    assert rule(name, typ) is want


# (case, replica texts, expected samples of the merge; other families are checked elsewhere)
CASES: list[tuple[str, list[str], Samples]] = [
    ("counters summed, label sets united",
     ["# TYPE meshd_requests_total counter\nmeshd_requests_total{outcome=\"ok\"} 3\n"
      "meshd_requests_total{outcome=\"error\"} 1\n",
      "# TYPE meshd_requests_total counter\nmeshd_requests_total{outcome=\"ok\"} 2\n"],
     {key("meshd_requests_total", outcome="ok"): 5.0,
      key("meshd_requests_total", outcome="error"): 1.0}),
    ("histogram buckets, _sum and _count summed",
     ["# TYPE h histogram\nh_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_count 2\n"
      "h_sum 0.5\n",
      "# TYPE h histogram\nh_bucket{le=\"0.1\"} 0\nh_bucket{le=\"+Inf\"} 3\nh_count 3\n"
      "h_sum 4.25\n"],
     {key("h_bucket", le="0.1"): 1.0, key("h_bucket", le="+Inf"): 5.0, key("h_count"): 5.0,
      key("h_sum"): 4.75}),
    ("additive gauges summed",
     ["# TYPE meshd_gateway_connections gauge\nmeshd_gateway_connections 2\n"
      "# TYPE meshd_gateway_in_flight gauge\nmeshd_gateway_in_flight 1\n",
      "# TYPE meshd_gateway_connections gauge\nmeshd_gateway_connections 3\n"
      "# TYPE meshd_gateway_in_flight gauge\nmeshd_gateway_in_flight 4\n"],
     {key("meshd_gateway_connections"): 5.0, key("meshd_gateway_in_flight"): 5.0}),
    ("sums over the same workers are one replica's figure, the largest",
     ["# TYPE meshd_kv_transfer_bytes gauge\nmeshd_kv_transfer_bytes 100\n"
      "# TYPE meshd_kv_lease_blocks_held gauge\nmeshd_kv_lease_blocks_held 7\n",
      "# TYPE meshd_kv_transfer_bytes gauge\nmeshd_kv_transfer_bytes 120\n"
      "# TYPE meshd_kv_lease_blocks_held gauge\nmeshd_kv_lease_blocks_held 6\n"],
     {key("meshd_kv_transfer_bytes"): 120.0, key("meshd_kv_lease_blocks_held"): 7.0}),
    ("cache health: ok is the worst, issues and event age the largest",
     ["# TYPE meshd_cache_health_ok gauge\nmeshd_cache_health_ok 1\n"
      "# TYPE meshd_cache_health_event_age_seconds gauge\n"
      "meshd_cache_health_event_age_seconds{worker=\"w1\"} 2.5\n"
      "meshd_cache_health_event_age_seconds{worker=\"w2\"} 9\n",
      "# TYPE meshd_cache_health_ok gauge\nmeshd_cache_health_ok 0\n"
      "# TYPE meshd_cache_health_issues gauge\n"
      "meshd_cache_health_issues{worker=\"w1\",issue=\"silent\"} 1\n"
      "# TYPE meshd_cache_health_event_age_seconds gauge\n"
      "meshd_cache_health_event_age_seconds{worker=\"w1\"} 4\n"],
     {key("meshd_cache_health_ok"): 0.0,
      key("meshd_cache_health_issues", worker="w1", issue="silent"): 1.0,
      key("meshd_cache_health_event_age_seconds", worker="w1"): 4.0,
      key("meshd_cache_health_event_age_seconds", worker="w2"): 9.0}),
    ("both replicas healthy: ok stays 1, not 2",
     ["# TYPE meshd_cache_health_ok gauge\nmeshd_cache_health_ok 1\n"] * 2,
     {key("meshd_cache_health_ok"): 1.0}),
    ("an unknown gauge and an untyped family: the largest, never summed",
     ["# TYPE meshd_new gauge\nmeshd_new 5\nplain 1\n",
      "# TYPE meshd_new gauge\nmeshd_new 3\nplain 4\n"],
     {key("meshd_new"): 5.0, key("plain"): 4.0}),
    ("a counter's start time: the earliest",
     ["# TYPE c_created gauge\nc_created{a=\"x\"} 1700000100\n",
      "# TYPE c_created gauge\nc_created{a=\"x\"} 1700000000\n"],
     {key("c_created", a="x"): 1700000000.0}),
    ("a summary: _sum and _count summed, quantiles left out",
     ["# TYPE s summary\ns{quantile=\"0.5\"} 1\ns_count 2\ns_sum 3\n",
      "# TYPE s summary\ns{quantile=\"0.5\"} 9\ns_count 1\ns_sum 1\n"],
     {key("s_count"): 3.0, key("s_sum"): 4.0}),
    ("a family of another type in a later reply is left out",
     ["# TYPE x_total counter\nx_total 2\n", "# TYPE x_total gauge\nx_total 40\n",
      "# TYPE x_total counter\nx_total 3\n"],
     {key("x_total"): 5.0}),
]


@pytest.mark.parametrize(("texts", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_merge(texts: list[str], want: Samples) -> None:
    got = merged(*texts)
    assert {k: v for k, v in got.items() if not k[0].startswith("meshd_gateway_replica")} \
        == want


def make_replica(requests: int, e2e: list[float], connections: int, transfer: float) -> str:
    """A real exposition from prometheus_client, shaped like a gateway replica's."""
    r = CollectorRegistry()
    c = Counter("meshd_requests", "Requests by outcome.", ["outcome"], registry=r)
    c.labels("ok").inc(requests)
    h = Histogram("meshd_e2e_seconds", "End-to-end request latency.",
                  buckets=(0.1, 1.0), registry=r)
    for v in e2e:
        h.observe(v)
    Gauge("meshd_gateway_connections", "Open client connections", registry=r).set(connections)
    Gauge("meshd_kv_transfer_bytes", "Sum over workers.", registry=r).set(transfer)
    Summary("meshd_rpc_seconds", "An RPC.", registry=r).observe(0.2)
    return generate_latest(r).decode()


def test_real_expositions_round_trip() -> None:
    a, b = make_replica(3, [0.05, 0.5], 2, 100.0), make_replica(2, [2.0], 1, 100.0)
    got = merged(a, b)
    assert got[key("meshd_requests_total", outcome="ok")] == 5.0
    assert got[key("meshd_e2e_seconds_bucket", le="0.1")] == 1.0
    assert got[key("meshd_e2e_seconds_bucket", le="1.0")] == 2.0
    assert got[key("meshd_e2e_seconds_bucket", le="+Inf")] == 3.0
    assert got[key("meshd_e2e_seconds_count")] == 3.0
    assert math.isclose(got[key("meshd_e2e_seconds_sum")], 2.55)
    assert got[key("meshd_gateway_connections")] == 3.0
    assert got[key("meshd_kv_transfer_bytes")] == 100.0  # not 200: both saw the same workers
    assert got[key("meshd_rpc_seconds_count")] == 2.0
    created = [v for (n, _), v in got.items() if n == "meshd_requests_created"]
    assert created == [min(make_samples(t)[key("meshd_requests_created", outcome="ok")]
                           for t in (a, b))]
    assert merge([parse(a)]) and merge([]) == []


def test_the_view_says_who_is_in_it() -> None:
    text = "# TYPE meshd_requests_total counter\nmeshd_requests_total 4\n"
    out = make_samples(fleet_exposition(
        [Reply(2, "h:3", "not { an exposition"), Reply(0, "h:1", text),
         Reply(1, "", None), Reply(3, "h:4", text)], expected=4))
    assert out[key("meshd_requests_total")] == 8.0
    assert out[key("meshd_gateway_replicas_expected")] == 4.0
    assert out[key("meshd_gateway_replicas_scraped")] == 2.0
    assert {k: v for k, v in out.items() if k[0] == "meshd_gateway_replica_up"} == {
        key("meshd_gateway_replica_up", replica="0", address="h:1"): 1.0,
        key("meshd_gateway_replica_up", replica="1", address=""): 0.0,
        key("meshd_gateway_replica_up", replica="2", address="h:3"): 0.0,
        key("meshd_gateway_replica_up", replica="3", address="h:4"): 1.0}


def test_fleet_families_in_a_reply_are_not_merged_again() -> None:
    inner = fleet_exposition([Reply(0, "a", "x 1\n")], expected=1).decode()
    out = make_samples(fleet_exposition([Reply(0, "a", inner), Reply(1, "b", "x 2\n")], 2))
    assert out[key("meshd_gateway_replicas_scraped")] == 2.0
    assert out[key("x")] == 2.0


@pytest.mark.parametrize("text", ["garbage here", "<html>", "x{a=\"1\" 2", "{}", "\x00"])
def test_parse_rejects_what_is_not_an_exposition(text: str) -> None:
    with pytest.raises(ValueError):
        parse(text)


async def test_every_gauge_the_gateway_exports_has_a_rule() -> None:
    """A new gauge must be placed in GAUGES: the default (the maximum) is only a safe guess."""
    rt = GatewayRuntime(GatewayConfig(port=0))
    gauges = {f.name for f in rt.server.registry.collect()
              if f.type == "gauge" and not f.name.endswith("_created")}
    assert gauges  # the stats, worker sums and cache health all export gauges
    assert gauges - set(GAUGES) == set()
    assert UNKNOWN_GAUGE is not Combine.SUM
