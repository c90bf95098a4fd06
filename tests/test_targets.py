"""`meshd targets` against a real control plane (gRPC, the admin key) and two real gateway
replicas sharing a port: the file_sd file follows nodes as they join and leave, is replaced
atomically and only on change, keeps a failed source's targets, and `promtool check config`
accepts cluster/prometheus/prometheus.yml reading it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from support.control import control_server, make_config, make_report
from support.net import free_port

from meshd import capabilities as caps
from meshd import cli
from meshd.commands.targets import render, replica_groups, worker_groups
from meshd.coordinator.actors import ensure_admin_key
from meshd.coordinator.gateway.config import GatewayConfig
from meshd.coordinator.gateway.runtime import GatewayRuntime, run_in_thread
from meshd.node_agent.client import ControlClient
from meshd.node_agent.identity import Identity
from meshd.proto.v1 import control_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
TARGETS_FILE = "/etc/prometheus/meshd-targets.json"  # where prometheus.yml reads it


class Gateway(NamedTuple):
    port: int  # the shared OpenAI port
    metrics_base: int  # replica i's own /metrics at metrics_base + i


@contextlib.contextmanager
def gateway_replicas(n: int) -> Iterator[Gateway]:
    """`n` real gateway replicas on their own event loop threads, sharing one port."""
    base = next(p for p in (free_port() for _ in range(50)) if all(
        _free(p + i) for i in range(1, n)))
    cfg = GatewayConfig(port=free_port(), replicas=n, metrics_port=base, metrics_timeout_s=0.5)
    started = []
    try:
        for i in range(n):
            started.append(run_in_thread(lambda i=i: GatewayRuntime(cfg, replica=i)))
        yield Gateway(cfg.port, base)
    finally:
        for thread, loop, rt in started:
            asyncio.run_coroutine_threadsafe(rt.stop(2), loop).result(15)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def make_worker(wid: str, port: int, role: str = "both") -> caps.Worker:
    return caps.Worker(wid, f"http://127.0.0.1:{port}", role, "meshd-tiny")


def by_component(path: Path) -> dict[str, list[tuple[list[str], dict[str, str]]]]:
    out: dict[str, list[tuple[list[str], dict[str, str]]]] = {}
    for row in json.loads(path.read_text()):
        out.setdefault(row["labels"]["component"], []).append((row["targets"], row["labels"]))
    return out


async def meshd(*argv: str) -> int:
    return await asyncio.to_thread(cli.main, ["targets", *argv])


async def test_the_file_follows_the_fleet(state_dir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "prometheus" / "meshd-targets.json"
    async with control_server(make_config(state_dir)) as run:
        ensure_admin_key(str(state_dir), run.store)
        a, b = Identity.generate(), Identity.generate()
        for ident in (a, b):
            run.store.add_key(ident.public_key, ident.node_id)
        ca, cb = ControlClient(run.address, a), ControlClient(run.address, b)
        await ca.register(caps.to_pb(make_report("host-a", (
            make_worker(f"{a.node_id}-p0", 18100, "prefill"),
            make_worker(f"{a.node_id}-d0", 18110, "decode")))))
        with gateway_replicas(2) as gw:
            flags = ("--out", str(out), "--state-dir", str(state_dir), "--coordinator",
                     run.address, "--gateway", f"127.0.0.1:{gw.port}")
            assert await meshd(*flags) == 0
            got = by_component(out)
            assert sorted(t for ts, _ in got["worker"] for t in ts) == [
                "127.0.0.1:18100", "127.0.0.1:18110"]
            assert {lb["worker_id"]: (lb["role"], lb["node_id"], lb["model"], lb["engine"])
                    for _, lb in got["worker"]} == {
                f"{a.node_id}-p0": ("prefill", a.node_id, "meshd-tiny", "embedded"),
                f"{a.node_id}-d0": ("decode", a.node_id, "meshd-tiny", "embedded")}
            assert got["gateway-replica"] == [
                ([f"127.0.0.1:{gw.metrics_base + i}"],
                 {"component": "gateway-replica", "instance": f"meshd-gateway-{i}",
                  "replica": str(i)}) for i in (0, 1)]
            assert "2 worker(s), 2 gateway replica(s)" in capsys.readouterr().out

            inode = out.stat().st_ino
            assert await meshd(*flags) == 0
            assert out.stat().st_ino == inode  # the same fleet: the file is left alone

            # B joins, A leaves: the next file has B's worker and none of A's
            await cb.register(caps.to_pb(make_report("host-b", (
                make_worker(f"{b.node_id}-b0", 18200),))))
            await ca.deregister()
            assert await meshd(*flags) == 0
            assert out.stat().st_ino != inode  # replaced by rename, never written in place
            got = by_component(out)
            assert [(ts, lb["node_id"]) for ts, lb in got["worker"]] == [
                (["127.0.0.1:18200"], b.node_id)]
            assert len(got["gateway-replica"]) == 2
            assert not [p for p in out.parent.iterdir() if p.name != out.name]  # no temp left

            # the gateway gone: its replicas' targets stay as they were, exit 1 says why
            before = out.read_text()
            down = ("--gateway", f"127.0.0.1:{free_port()}")
            assert await meshd(*flags[:6], *down) == 1
            assert out.read_text() == before
            assert "keeping that source's last targets" in capsys.readouterr().out
        await ca.close()
        await cb.close()
    # the coordinator gone: its workers' targets stay too
    assert await meshd("--out", str(out), "--state-dir", str(state_dir), "--coordinator",
                       f"127.0.0.1:{free_port()}", "--no-gateway") == 1
    assert by_component(out)["worker"][0][0] == ["127.0.0.1:18200"]
    # ... but a first run that knows no workers writes nothing and says so
    fresh = tmp_path / "new.json"
    assert await meshd("--out", str(fresh), "--state-dir", str(state_dir), "--coordinator",
                       f"127.0.0.1:{free_port()}", "--no-gateway") == 1
    assert not fresh.exists()
    assert "coordinator 127.0.0.1:" in capsys.readouterr().err

    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "cluster" / "prometheus", conf)
    text = (conf / "prometheus.yml").read_text()
    entry = f'files: ["{TARGETS_FILE}"]'
    assert text.count(entry) == 2  # the workers' job and the replicas' job
    (conf / "prometheus.yml").write_text(text.replace(entry, f'files: ["{out}"]'))
    check = subprocess.run(["promtool", "check", "config", "prometheus.yml"], cwd=conf,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "WARNING" not in check.stdout + check.stderr  # the file exists and parses


def make_status(*nodes: tuple[str, str, tuple[tuple[str, str], ...]]) -> pb.StatusReply:
    reply = pb.StatusReply()
    for node_id, state, workers in nodes:
        reply.nodes.append(pb.NodeStatus(node_id=node_id, state=state, workers=[
            pb.WorkerInfo(worker_id=w, endpoint=ep, role=pb.WORKER_ROLE_BOTH, model="m",
                          engine="vllm") for w, ep in workers]))
    return reply


def test_which_nodes_and_endpoints_become_worker_targets() -> None:
    reply = make_status(
        ("n-1", "alive", (("w1", "http://10.0.0.1:8100"), ("w2", "http://[fd00::2]:8110"))),
        ("n-2", "suspect", (("w3", "http://gpu-3.lan:8100"),)),
        ("n-3", "dead", (("w4", "http://10.0.0.4:8100"),)),
        ("n-4", "left", (("w5", "http://10.0.0.5:8100"),)),
        ("n-5", "alive", (("w6", "not a url"),)))
    assert [(g.targets, g.labels["worker_id"]) for g in worker_groups(reply)] == [
        (("10.0.0.1:8100",), "w1"), (("[fd00::2]:8110",), "w2"), (("gpu-3.lan:8100",), "w3")]


REPLICAS = """# TYPE meshd_gateway_replica_up gauge
meshd_gateway_replica_up{replica="0",address="127.0.0.1:9300"} 1.0
meshd_gateway_replica_up{replica="1",address="10.0.0.9:9301"} 1.0
meshd_gateway_replica_up{replica="2",address=""} 0.0
meshd_gateway_replica_up{replica="3",address="10.0.0.8:9303"} 0.0
"""


@pytest.mark.parametrize(("asked", "first"), [("10.0.0.9", "10.0.0.9:9300"),
                                              ("127.0.0.1", "127.0.0.1:9300"),
                                              ("fd00::9", "[fd00::9]:9300")])
def test_replica_targets_from_the_fleet_view(asked: str, first: str) -> None:
    """A loopback address is the replica that answered, on the host asked (when that is not
    loopback too); a replica without an address is left out; one left out of the view (0)
    keeps its target, so Prometheus shows it down."""
    groups = replica_groups(REPLICAS, asked)
    assert [(g.targets[0], g.labels["instance"]) for g in groups] == [
        (first, "meshd-gateway-0"), ("10.0.0.9:9301", "meshd-gateway-1"),
        ("10.0.0.8:9303", "meshd-gateway-3")]
    with pytest.raises(ValueError, match="has no meshd_gateway_replica_up"):
        replica_groups("# TYPE other gauge\nother 1\n", asked)


def test_render_is_stable() -> None:
    reply = make_status(("n-2", "alive", (("b", "http://10.0.0.2:1"),)),
                        ("n-1", "alive", (("a", "http://10.0.0.1:1"),)))
    groups = worker_groups(reply) + replica_groups(REPLICAS, "10.0.0.9")
    assert render(groups) == render(reversed(groups))
    rows = json.loads(render(groups))
    assert [r["labels"]["component"] for r in rows] == ["gateway-replica"] * 3 + ["worker"] * 2
