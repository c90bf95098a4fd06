"""Gateway replicas as named, detached Ray actors (`meshd-gateway-<i>` in the meshd namespace).

Each replica is its own process running a `GatewayRuntime` on a uvloop event loop in a thread;
all replicas bind the same port with SO_REUSEPORT, so the kernel spreads connections over them
and the gateway uses every core. Membership comes from the registry actor's routing set.
Replica i serves its own metrics on a port of its own and publishes it (`metrics_address`), so
/metrics on the shared port merges every replica's (`fleet.py`).

On the Ray dashboard a replica shows as `meshd-gateway-<i>` with a repr naming its replica
index, the OpenAI port and its own metrics address (Ray reads the repr once, at start). Its
live figures (in flight, workers, requests by outcome, TTFT p50/p95, prefix hit rate:
`ray_figures.py`) are copied into `ray.util.metrics`, tagged `actor=meshd-gateway-<i>`, by a
`RayMetricsBridge` task on the replica's own event loop, where that state lives.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Any

import ray

from meshd.capabilities import Member, member_from_dict
from meshd.config import build
from meshd.coordinator import actors
from meshd.coordinator.gateway.config import GatewayConfig
from meshd.coordinator.gateway.fleet import Peer, Peers, connect_host
from meshd.coordinator.gateway.ray_figures import GATEWAY_SPECS, GatewayFigures
from meshd.coordinator.gateway.runtime import GatewayRuntime, run_in_thread, tune_gc
from meshd.coordinator.ray_metrics import RayMetricsBridge
from meshd.endpoints import host_port

log = logging.getLogger("meshd.gateway")
PREFIX = "meshd-gateway-"
RECEIPT_KEY_FILE = "receipt.key"
RECORDS_DIR = "records"  # request records, one file per replica


class _GatewayActor:
    def __init__(self, config: dict[str, Any], namespace: str, replica: int = 0) -> None:
        logging.basicConfig(level=logging.INFO)
        self.config = build(GatewayConfig, config, "gateway.")
        registry = actors.find(namespace)
        snapshot = _sibling_snapshot(namespace, replica)

        async def membership() -> list[Member]:
            if registry is None:
                return []
            rows = await asyncio.to_thread(ray.get, registry.workers.remote(), timeout=10)
            return [member_from_dict(r) for r in rows]

        async def node_keys() -> list[dict[str, Any]]:
            if registry is None:
                return []
            return list(await asyncio.to_thread(ray.get, registry.node_keys.remote(),
                                                timeout=10))

        peers = (None if self.config.metrics_port else
                 _ray_peers(namespace, self.config, replica))
        ledger = _ledger(namespace, self.config)
        self.thread, self.loop, self.runtime = run_in_thread(
            lambda: GatewayRuntime(self.config, membership, snapshot, replica, peers, ledger,
                                   node_keys))
        tune_gc()  # this process is one replica
        host = self.config.host  # bound to every address: siblings may be on other nodes
        self._metrics_host = (ray.util.get_node_ip_address() if connect_host(host) != host
                              else host)
        self.replica = replica
        bridge = RayMetricsBridge(f"{PREFIX}{replica}", GATEWAY_SPECS,
                                  GatewayFigures(self.runtime))
        self._figures = asyncio.run_coroutine_threadsafe(bridge.run(), self.loop)

    def __repr__(self) -> str:
        """What the Ray dashboard shows (read once, when the actor starts)."""
        c = getattr(self, "config", None)
        if c is None or not hasattr(self, "_figures"):
            return "meshd gateway replica (starting)"
        fleet = self.runtime.fleet
        own = (f", own metrics http://{host_port(self._metrics_host, fleet.port)}/metrics"
               if fleet is not None else "")
        return (f"meshd gateway replica {self.replica} of {c.replicas}: OpenAI API on "
                f"{host_port(c.host, c.port)}{own}")

    def metrics_address(self) -> tuple[str, int]:
        """(host, port) of this replica's own /metrics, for the siblings' fleet view."""
        assert self.runtime.fleet is not None
        return self._metrics_host, self.runtime.fleet.port

    def snapshot(self) -> bytes:
        """This replica's prefix index (msgpack), for a sibling that starts later."""
        return asyncio.run_coroutine_threadsafe(self._snapshot(), self.loop).result(10)

    async def _snapshot(self) -> bytes:
        return self.runtime.index_snapshot()

    def info(self) -> dict[str, Any]:
        fut = asyncio.run_coroutine_threadsafe(self._describe(), self.loop)
        return fut.result(10)

    async def _describe(self) -> dict[str, Any]:
        return self.runtime.describe()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._figures.cancel()
        fut = asyncio.run_coroutine_threadsafe(self.runtime.stop(timeout_s), self.loop)
        try:
            fut.result(timeout_s + 5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)


def _ledger(namespace: str, config: GatewayConfig) -> Any:
    """The fleet ledger every replica shares (deployed with the coordinator), or None: then
    each replica keeps its own and says so."""
    from meshd.coordinator import ledger_actor

    handle = ledger_actor.find(namespace)
    if handle is None:
        log.warning("no fleet ledger actor in namespace %r", namespace)
        return None
    return ledger_actor.RayLedgerClient(handle, config.governance.ledger.timeout_s)


def _sibling_snapshot(namespace: str, replica: int, timeout_s: float = 5.0) -> bytes | None:
    """A running sibling's index snapshot. At first start only lower-numbered replicas are
    asked (they never ask back, so concurrent starts cannot wait on each other); a replica that
    Ray restarted asks every sibling."""
    restarted = ray.get_runtime_context().was_current_actor_reconstructed
    for i in range(64):
        if i == replica or (i > replica and not restarted):
            continue
        try:
            sibling = ray.get_actor(f"{PREFIX}{i}", namespace=namespace)
        except ValueError:
            if i > replica:
                break
            continue
        try:
            raw: Any = ray.get(sibling.snapshot.remote(), timeout=timeout_s)
            snap = bytes(raw)
        except Exception as e:  # a sibling starting or dying: try the next, else start empty
            log.info("no index snapshot from gateway replica %d: %s", i, e)
            continue
        log.info("starting from replica %d's prefix index snapshot (%d bytes)", i, len(snap))
        return snap
    return None


def _ray_peers(namespace: str, config: GatewayConfig, replica: int) -> Peers:
    """The siblings' metrics ports as their actors publish them (free ports move when Ray
    restarts a replica, so they are asked at every fleet scrape). A replica that does not
    answer in time keeps its last known address."""
    known: dict[int, Peer] = {}

    async def peers() -> list[Peer]:
        try:
            known.update(await asyncio.to_thread(
                _metrics_addresses, namespace, config.replicas, replica,
                config.metrics_timeout_s / 4))
        except Exception as e:  # Ray busy or down: the last known addresses
            log.info("gateway metrics addresses: %s", e)
        return list(known.values())

    return peers


def _metrics_addresses(namespace: str, replicas: int, me: int, timeout_s: float
                       ) -> dict[int, Peer]:
    refs: dict[int, Any] = {}
    for i in range(replicas):
        if i == me:
            continue
        try:
            refs[i] = ray.get_actor(f"{PREFIX}{i}", namespace=namespace
                                    ).metrics_address.remote()
        except ValueError:  # not running (yet)
            continue
    if not refs:
        return {}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    done = set(ready)
    out = {}
    for i, ref in refs.items():
        if ref in done:
            try:
                host, port = ray.get(ref, timeout=0)
            except Exception:  # that replica failed its call: skip it
                continue
            out[i] = Peer(i, str(host), int(port))
    return out


GatewayActor: Any = ray.remote(num_cpus=0, max_restarts=-1)(_GatewayActor)


def deploy(config: GatewayConfig, namespace: str = "meshd", timeout_s: float = 60.0,
           state_dir: str = "") -> list[Any]:
    """Start `config.replicas` gateway actors (or find running ones) and wait until each
    serves; returns their handles. `state_dir`: the coordinator's, where the replicas' shared
    receipt key and their request records live unless `[gateway.receipts] key_file` and
    `[gateway.records] dir` name other places."""
    state = Path(state_dir).expanduser() if state_dir else None
    if state is not None and not config.receipts.key_file:
        config = dataclasses.replace(config, receipts=dataclasses.replace(
            config.receipts, key_file=str(state / RECEIPT_KEY_FILE)))
    if state is not None and not config.records.dir:
        config = dataclasses.replace(config, records=dataclasses.replace(
            config.records, dir=str(state / RECORDS_DIR)))
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # on this node (the head): the OpenAI port clients are given, the shared state dir
    node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    handles = [GatewayActor.options(name=f"{PREFIX}{i}", namespace=namespace,
                                    lifetime="detached", get_if_exists=True,
                                    scheduling_strategy=node)
               .remote(dataclasses.asdict(config), namespace, i)
               for i in range(config.replicas)]
    ray.get([h.info.remote() for h in handles], timeout=timeout_s)
    return handles


def stop(namespace: str = "meshd", timeout_s: float = 15.0) -> int:
    """Stop every gateway replica; returns how many were running."""
    n = 0
    for i in range(64):
        try:
            h = ray.get_actor(f"{PREFIX}{i}", namespace=namespace)
        except ValueError:
            break
        try:
            ray.get(h.shutdown.remote(), timeout=timeout_s)
        except Exception as e:  # dying already: kill regardless
            log.warning("gateway %d shutdown: %s", i, e)
        ray.kill(h, no_restart=True)
        n += 1
    return n
