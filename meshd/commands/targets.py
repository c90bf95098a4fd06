"""`meshd targets`: the mesh's Prometheus scrape targets, as a `file_sd` JSON file.

Two sources, each asked once per round:
- workers: every worker of the nodes the registry has not given up on (alive or suspect), from
  the coordinator's node table (`Status`, signed with the admin key as `meshd status` does). A
  worker's own `/metrics` is open without the worker token. A node that goes dead or leaves
  takes its workers out of the next file, one that joins brings them in.
- gateway replicas: each replica's own metrics port, as the fleet view on the gateway's port
  names it (`meshd_gateway_replica_up{replica, address}`, `gateway/fleet.py`). A replica's
  address on loopback is rewritten to the host the gateway was asked at. Each replica keeps
  `instance="meshd-gateway-<i>"`, so its series do not change when Ray restarts it on a new
  port. Its samples are every replica's share of what the fleet view on the gateway's port sums
  (cluster/prometheus/prometheus.yml keeps only `up` from them, so nothing is counted twice).

Every target carries `component` (worker | gateway-replica), which the scrape config's jobs
select on. The file is replaced atomically (a temporary file in the same directory, fsync,
rename) and only when its content changes; a source that fails in a round keeps its targets
from the round before (or from the file already there), so a coordinator restart or a busy
gateway never empties Prometheus's view.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from prometheus_client.parser import text_string_to_metric_families

from meshd import capabilities as caps
from meshd import endpoints
from meshd.commands import CommandError, gateway_address
from meshd.commands.status import fetch
from meshd.config import MeshConfig
from meshd.coordinator.actors import ADMIN_KEY_FILE
from meshd.node_agent import identity
from meshd.node_agent.client import ControlError
from meshd.proto.v1 import control_pb2 as pb

log = logging.getLogger("meshd.targets")
WORKER, REPLICA = "worker", "gateway-replica"
SCRAPED_STATES = ("alive", "suspect")
REPLICA_FAMILY = "meshd_gateway_replica_up"


class TargetGroup(NamedTuple):
    """One `file_sd` entry: addresses (`host:port`) sharing one label set."""

    targets: tuple[str, ...]
    labels: Mapping[str, str]

    @property
    def component(self) -> str:
        return self.labels.get("component", "")


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def worker_groups(reply: pb.StatusReply) -> list[TargetGroup]:
    """A group per worker of each alive or suspect node; a worker whose endpoint does not
    parse is left out (the registry refuses those at registration)."""
    out = []
    for n in reply.nodes:
        if n.state not in SCRAPED_STATES:
            continue
        for m in n.workers:
            try:
                w = caps.worker_from_pb(m)
                ep = endpoints.parse(w.endpoint, ("http",))
            except ValueError as e:
                log.warning("node %s: worker %s left out: %s", n.node_id, m.worker_id, e)
                continue
            out.append(TargetGroup((_address(ep.host, ep.port),), {
                "component": WORKER, "node_id": n.node_id, "worker_id": w.worker_id,
                "role": w.role, "model": w.model, "engine": w.engine}))
    return out


def replica_groups(metrics_text: str, asked_host: str) -> list[TargetGroup]:
    """A group per gateway replica the fleet view names with an address. Raises ValueError
    for text that is not an exposition or holds no `meshd_gateway_replica_up`."""
    found: dict[int, str] = {}
    seen = False
    for fam in text_string_to_metric_families(metrics_text):
        if fam.name != REPLICA_FAMILY:
            continue
        seen = True
        for s in fam.samples:
            addr, replica = s.labels.get("address", ""), s.labels.get("replica", "")
            if not addr or not replica.isdigit():
                continue  # a replica the view has no address for
            try:
                ep = endpoints.parse(f"http://{addr}")
            except ValueError:
                continue
            host = ep.host
            if endpoints.is_loopback(host) and not endpoints.is_loopback(asked_host):
                host = asked_host  # the replica that answered: on the host we asked
            found[int(replica)] = _address(host, ep.port)
    if not seen:
        raise ValueError(f"the gateway's /metrics has no {REPLICA_FAMILY} (not a meshd "
                         "gateway, or one without replicas)")
    return [TargetGroup((addr,), {"component": REPLICA, "replica": str(i),
                                  "instance": f"meshd-gateway-{i}"})
            for i, addr in sorted(found.items())]


def render(groups: Iterable[TargetGroup]) -> str:
    """The file_sd JSON, in a stable order (the same fleet gives the same bytes)."""
    ordered = sorted(groups, key=lambda g: (g.component, json.dumps(sorted(g.labels.items())),
                                            g.targets))
    rows = [{"targets": list(g.targets), "labels": dict(sorted(g.labels.items()))}
            for g in ordered]
    return json.dumps(rows, indent=2) + "\n"


def parse_file(text: str) -> list[TargetGroup]:
    """The groups of a file_sd JSON file ([] for one that is not)."""
    try:
        rows = json.loads(text)
        return [TargetGroup(tuple(map(str, r["targets"])),
                            {str(k): str(v) for k, v in r.get("labels", {}).items()})
                for r in rows]
    except (ValueError, TypeError, KeyError, AttributeError):
        return []


def write_atomic(path: Path, text: str) -> bool:
    """Replace `path` with `text` (temp file in its directory, fsync, rename, mode 0644);
    False, writing nothing, when it already holds exactly that."""
    with contextlib.suppress(OSError):
        if path.read_text() == text:
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # Prometheus runs as its own user; targets are not secret
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


def _get_text(address: str, path: str, timeout_s: float) -> str:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=timeout_s) as r:
        return str(r.read().decode("utf-8", "replace"))


class Sources(NamedTuple):
    coordinator: str  # host:port of the control plane
    gateway: str  # host:port of the gateway's OpenAI port ("" = no gateway targets)
    ident: identity.Identity  # the admin key
    timeout_s: float


def collect(src: Sources, last: Mapping[str, Sequence[TargetGroup]]
            ) -> tuple[dict[str, list[TargetGroup]], list[str]]:
    """One round: the groups by component, and what failed (its groups are `last`'s)."""
    out: dict[str, list[TargetGroup]] = {}
    failed = []
    try:
        out[WORKER] = worker_groups(asyncio.run(fetch(src.coordinator, src.ident,
                                                      src.timeout_s)))
    except ControlError as e:
        failed.append(f"coordinator {src.coordinator}: {e.code.name}: {e.detail}")
        out[WORKER] = list(last.get(WORKER, ()))
    if src.gateway:
        host = src.gateway.rpartition(":")[0].strip("[]")
        try:
            out[REPLICA] = replica_groups(_get_text(src.gateway, "/metrics", src.timeout_s),
                                          host)
        except (OSError, ValueError) as e:
            failed.append(f"gateway {src.gateway}: {e}")
            out[REPLICA] = list(last.get(REPLICA, ()))
    return out, failed


def run(args: argparse.Namespace, cfg: MeshConfig) -> int:
    try:
        ident = identity.load(f"{cfg.coordinator.state_dir}/{ADMIN_KEY_FILE}")
    except identity.IdentityError as e:
        raise CommandError(f"{e}; run `meshd targets` on the coordinator host (or point "
                           "--state-dir at its state dir)") from None
    if args.interval is not None and args.interval <= 0:
        raise CommandError(f"--interval must be > 0, got {args.interval}")
    gateway = "" if args.no_gateway else (
        args.gateway or gateway_address(cfg.gateway.host, cfg.gateway.port))
    src = Sources(args.coordinator or cfg.coordinator.address, gateway, ident,
                  cfg.agent.rpc_timeout_s)
    out = Path(args.out)
    last: dict[str, list[TargetGroup]] = {}
    with contextlib.suppress(OSError):
        for g in parse_file(out.read_text()):
            last.setdefault(g.component, []).append(g)
    while True:
        groups, failed = collect(src, last)
        for why in failed:
            print(f"meshd targets: {why}; keeping that source's last targets", flush=True)
        down = [why for why in failed if why.startswith("coordinator")]
        if args.interval is None and down and WORKER not in last:
            raise CommandError(down[0])  # one shot and no workers known: write nothing
        last = groups
        changed = write_atomic(out, render(g for gs in groups.values() for g in gs))
        if changed or args.interval is None:
            print(f"{out}: {len(groups.get(WORKER, []))} worker(s), "
                  f"{len(groups.get(REPLICA, []))} gateway replica(s)", flush=True)
        if args.interval is None:
            return 1 if failed else 0
        time.sleep(args.interval)
