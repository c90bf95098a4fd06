"""Gateway replicas as Ray actors: one port, and a later replica starts from a sibling's index."""

from __future__ import annotations

import urllib.request
from typing import Any

import ray
from support.net import free_port

from meshd.coordinator.gateway import actor
from meshd.coordinator.gateway.config import GatewayConfig


def test_replicas_share_the_port_and_bootstrap_from_a_sibling(ray_session: Any) -> None:
    port = free_port()
    handles = actor.deploy(GatewayConfig(port=port, replicas=2), namespace="meshd-gw-test")
    try:
        infos = ray.get([h.info.remote() for h in handles], timeout=30)
        assert [i["port"] for i in infos] == [port, port]
        assert [i["from_snapshot"] for i in infos] == [False, True]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            assert r.status == 200
    finally:
        assert actor.stop("meshd-gw-test") == 2
