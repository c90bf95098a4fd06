"""Two real gateway replicas on one shared port: every /metrics scrape is the fleet's."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.mesh import engines
from support.net import free_port

from meshd.coordinator.gateway.config import GatewayConfig
from meshd.coordinator.gateway.runtime import GatewayRuntime, run_in_thread

Key = tuple[str, frozenset[tuple[str, str]]]
Samples = dict[Key, float]
OK: Key = ("meshd_requests_total", frozenset({("outcome", "ok")}))
R200: Key = ("meshd_gateway_responses_total", frozenset({("status", "200")}))
E2E: Key = ("meshd_e2e_seconds_count", frozenset())
SCRAPED: Key = ("meshd_gateway_replicas_scraped", frozenset())
EXPECTED: Key = ("meshd_gateway_replicas_expected", frozenset())


def make_samples(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def make_port_pair() -> int:
    """A base port such that base and base + 1 are free (replica 0 and 1)."""
    for _ in range(50):
        base = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base
    raise RuntimeError("no two adjacent free ports")


def get(port: int, path: str = "/metrics") -> tuple[str, str]:
    """GET on a new connection (so the kernel may pick another replica): (request id, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"connection": "close"})
        r = conn.getresponse()
        body = r.read().decode()
        assert r.status == 200, body
        return r.headers.get("x-request-id", ""), body
    finally:
        conn.close()


def complete(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/completions", json.dumps(
            {"model": "meshd-tiny", "prompt": "fleet metrics " * 3, "max_tokens": 2,
             "temperature": 0}), {"content-type": "application/json", "connection": "close"})
        r = conn.getresponse()
        assert r.status == 200, r.read()
        r.read()
    finally:
        conn.close()


Replica = tuple[threading.Thread, asyncio.AbstractEventLoop, GatewayRuntime]


@contextlib.contextmanager
def replicas(cfg: GatewayConfig) -> Iterator[list[Replica]]:
    """`cfg.replicas` runtimes, each on its own event loop thread, sharing `cfg.port`."""
    started: list[Replica] = []
    try:
        for i in range(cfg.replicas):
            started.append(run_in_thread(lambda i=i: GatewayRuntime(cfg, replica=i)))
        yield started
    finally:
        for r in started:
            stop(r)


def stop(r: Replica) -> None:
    thread, loop, rt = r
    if thread.is_alive():
        asyncio.run_coroutine_threadsafe(rt.stop(2), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_every_scrape_of_the_shared_port_reports_the_fleet(tmp_path: Path) -> None:
    base = make_port_pair()
    with engines([("w0", "both")], tmp_path) as (w0,):
        cfg = GatewayConfig(port=free_port(), replicas=2, metrics_port=base,
                            metrics_timeout_s=0.5, static_workers=(w0.url,))
        with replicas(cfg) as reps:
            assert [r[2].describe()["metrics_port"] for r in reps] == [base, base + 1]
            # K requests on new connections, until the kernel has given both replicas some.
            k = 0
            while k < 8 or not all(make_samples(get(base + i)[1]).get(OK) for i in (0, 1)):
                complete(cfg.port)
                k += 1
                assert k < 100, "SO_REUSEPORT never picked the second replica"
            parts = [make_samples(get(base + i)[1]) for i in (0, 1)]
            assert parts[0][OK] + parts[1][OK] == k  # each private port: its own part
            assert parts[0][E2E] + parts[1][E2E] == k

            prefixes = {r[2].server._rid_prefix: i for i, r in enumerate(reps)}
            served: set[int] = set()
            scrapes = 0
            while len(served) < 2 or scrapes < 6:
                rid, text = get(cfg.port)
                served.add(prefixes[rid.rsplit("-", 1)[0] + "-"])
                fleet = make_samples(text)
                assert fleet[SCRAPED] == fleet[EXPECTED] == 2
                assert fleet[OK] == k and fleet[E2E] == k
                assert fleet[R200] == k + scrapes  # earlier scrapes were answered, once each
                for name, labels in fleet:
                    if name.endswith("_bucket"):  # histograms: the parts' sum, bucket by bucket
                        assert fleet[name, labels] == sum(p.get((name, labels), 0)
                                                          for p in parts)
                hops = [("meshd_cache_health_ok", min), ("meshd_kv_transfer_bytes", max),
                        ("meshd_kv_lease_blocks_held", max)]
                for name, pick in hops:  # shared figures: one replica's, never the sum
                    assert fleet[name, frozenset()] == pick(p[name, frozenset()] for p in parts)
                assert fleet["meshd_cache_health_ok", frozenset()] == 1.0
                scrapes += 1
                assert scrapes < 60, "SO_REUSEPORT never picked both replicas for a scrape"

            # Replica 1 goes; something that accepts and never answers holds its port.
            stop(reps[1])
            with socket.socket() as hole:
                hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                hole.bind(("127.0.0.1", base + 1))
                hole.listen(8)
                t0 = time.monotonic()
                _, text = get(cfg.port)
                assert time.monotonic() - t0 < cfg.metrics_timeout_s + 1.5
            fleet = make_samples(text)
            assert fleet[SCRAPED] == 1 and fleet[EXPECTED] == 2
            assert fleet["meshd_gateway_replica_up",
                         frozenset({("replica", "1"), ("address", f"127.0.0.1:{base + 1}")})] == 0
            assert fleet["meshd_gateway_replica_up",
                         frozenset({("replica", "0"), ("address", f"127.0.0.1:{base}")})] == 1
            assert fleet[OK] == parts[0][OK]  # replica 0's part alone, and it says so


def test_private_port_serves_only_metrics() -> None:
    cfg = GatewayConfig(port=free_port(), replicas=1, metrics_port=0)
    with replicas(cfg) as reps:
        port = reps[0][2].describe()["metrics_port"]
        assert port and port != cfg.port
        own = make_samples(get(port)[1])
        assert SCRAPED not in own and ("meshd_gateway_in_flight", frozenset()) in own
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
        assert e.value.code == 404
        assert json.loads(e.value.read())["error"]["code"] == "not_found"
        fleet = make_samples(get(cfg.port)[1])  # no siblings to ask: its own, complete
        assert fleet[SCRAPED] == fleet[EXPECTED] == 1


@pytest.mark.parametrize(("fields", "message"), [
    ({"metrics_port": -1}, "gateway.metrics_port: replica ports -1..0 must lie in 0..65535"),
    ({"metrics_port": 65535, "replicas": 2}, "replica ports 65535..65536 must lie"),
    ({"port": 9001, "metrics_port": 9000, "replicas": 4}, "9000..9003 include gateway.port 9001"),
    ({"metrics_timeout_s": 0}, "gateway.metrics_timeout_s: must be > 0"),
])
def test_metrics_port_config_is_checked(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        GatewayConfig(**fields)
    assert GatewayConfig(port=9004, metrics_port=9000, replicas=4).metrics_port == 9000
