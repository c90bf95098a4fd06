"""Gateway replicas as Ray actors: one port, a later replica starts from a sibling's index, and
/metrics on the shared port is the fleet's (the replicas find each other's ports through Ray)."""

from __future__ import annotations

import urllib.request
from typing import Any

import ray
from prometheus_client.parser import text_string_to_metric_families
from support.net import free_port

from meshd.coordinator.gateway import actor
from meshd.coordinator.gateway.config import GatewayConfig

R200 = ("meshd_gateway_responses_total", frozenset({("status", "200")}))


def make_samples(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=15) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_replicas_share_the_port_and_bootstrap_from_a_sibling(ray_session: Any) -> None:
    port = free_port()
    cfg = GatewayConfig(port=port, replicas=2, metrics_port=0, metrics_timeout_s=10.0)
    handles = actor.deploy(cfg, namespace="meshd-gw-test")
    try:
        infos = ray.get([h.info.remote() for h in handles], timeout=30)
        assert [i["port"] for i in infos] == [port, port]
        assert [i["from_snapshot"] for i in infos] == [False, True]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            assert r.status == 200
        own = [i["metrics_port"] for i in infos]  # free ports, published through the actors
        assert all(own) and len({*own, port}) == 3
        for n in range(4):  # whichever replica answers, the fleet's figures
            fleet = make_samples(f"http://127.0.0.1:{port}/metrics")
            assert fleet["meshd_gateway_replicas_scraped", frozenset()] == 2
            assert fleet[R200] == 1 + n  # the /health above and each earlier scrape, once
        parts = [make_samples(f"http://127.0.0.1:{p}/metrics") for p in own]
        assert sum(p.get(R200, 0) for p in parts) == 5
    finally:
        assert actor.stop("meshd-gw-test") == 2
