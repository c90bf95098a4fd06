"""The coordinator as named, detached Ray actors in the `meshd` namespace.

`RegistryActor` (name `meshd-registry`) serves the gRPC control plane and its `/metrics`, and
keeps the trust store and node records in SQLite under the coordinator's state dir. Ray restarts
it if it dies (`max_restarts=-1`); the new instance reloads the store, binds the same port, and
running agents re-attach on their next heartbeat.

On the Ray dashboard it shows as `meshd-registry` with a repr naming its control-plane and
metrics addresses. Ray reads an actor's repr once, when the actor (re)starts, so the live
figures go through `ray.util.metrics` instead: `ControlMetrics` records node counts and
control-plane counters as they change, and a `RayMetricsBridge` task on the actor's loop
copies the worker counts (`ray_figures.py`) every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from typing import Any

import ray

from meshd.capabilities import member_to_dict
from meshd.config import CoordinatorConfig
from meshd.coordinator.grpc_server import ControlServer
from meshd.coordinator.metrics import ControlMetrics
from meshd.coordinator.ray_figures import REGISTRY_SPECS, registry_samples
from meshd.coordinator.ray_metrics import RayMetricsBridge
from meshd.coordinator.store import KeyRecord, Store
from meshd.endpoints import host_port
from meshd.node_agent import identity

REGISTRY_NAME = "meshd-registry"
ADMIN_KEY_FILE = "admin.key"
log = logging.getLogger("meshd.coordinator")


def ensure_admin_key(state_dir: str, store: Store) -> identity.Identity:
    """The coordinator host's admin identity (`meshd status` signs with it), trusted as admin."""
    ident = identity.load_or_create(state_dir, ADMIN_KEY_FILE)
    rec = store.key(ident.public_key)
    if rec is None or rec.role != "admin" or rec.state != "trusted":
        store.add_key(ident.public_key, ident.node_id, "local admin", role="admin",
                      source="local-admin")
    return ident


def published_key(rec: KeyRecord) -> dict[str, Any]:
    """A node key as the mesh publishes it: id, public key, state, times in ms."""
    return {"node_id": rec.node_id, "public_key": rec.public_key.hex(), "state": rec.state,
            "added_at_ms": int(rec.added_at * 1000),
            "revoked_at_ms": None if rec.revoked_at is None else int(rec.revoked_at * 1000)}


class _RegistryActor:
    async def __init__(self, config: dict[str, Any]) -> None:  # type: ignore[misc]
        # Async init: serving starts here, so an actor Ray restarts serves again at once.
        logging.basicConfig(level=logging.INFO)
        self.config = CoordinatorConfig(**config)
        self.store = Store(self.config.state_dir)
        ensure_admin_key(self.config.state_dir, self.store)
        self.metrics = ControlMetrics(ray_mirror=True)
        self.server = ControlServer(self.config, self.store, self.metrics)
        self._ports = await self.server.start()
        table = self.server.plane.table
        bridge = RayMetricsBridge(REGISTRY_NAME, REGISTRY_SPECS, lambda: registry_samples(table))
        self._figures = asyncio.get_running_loop().create_task(bridge.run())

    def __repr__(self) -> str:
        """What the Ray dashboard shows (read once, when the actor starts)."""
        ports = getattr(self, "_ports", None)
        if ports is None:
            return "meshd registry (starting)"
        host = self.config.grpc_host
        return (f"meshd registry: control plane {host_port(host, ports[0])}, "
                f"metrics http://{host_port(host, ports[1])}/metrics")

    async def ready(self) -> dict[str, Any]:
        """The bound ports and the process id (the actor serves once constructed)."""
        return {"grpc_port": self._ports[0], "metrics_port": self._ports[1], "pid": os.getpid(),
                "started_at": self.server.plane.started_at}

    async def node_counts(self) -> dict[str, int]:
        return self.server.plane.table.counts()

    async def workers(self) -> list[dict[str, Any]]:
        """The routing set: workers of alive nodes, as plain dicts (`member_to_dict`)."""
        return [member_to_dict(m) for m in self.server.plane.routable_workers()]

    async def node_keys(self) -> list[dict[str, Any]]:
        """The trust store's agent keys as `GET /v1/meshd/keys` publishes them (receipts are
        checked against these): revoked ones stay listed with their revocation time."""
        return [published_key(r) for r in self.store.list_keys() if r.role == "agent"]

    async def shutdown(self) -> None:
        self._figures.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._figures
        await self.server.stop()
        self.store.close()


# Ray's stubs lack `max_concurrency`; async actors need it to serve many calls at once.
RegistryActor: Any = ray.remote(  # type: ignore[call-overload]
    num_cpus=0, max_restarts=-1, max_concurrency=1000)(_RegistryActor)


def deploy(config: CoordinatorConfig, namespace: str = "meshd", timeout_s: float = 60.0
           ) -> tuple[Any, dict[str, Any]]:
    """Create (or find) the registry actor and the fleet ledger (`ledger_actor.py`, persisting
    under the same state dir) and wait until both serve; returns (registry handle, info)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from meshd.coordinator import ledger_actor
    from meshd.scheduler.admission.ledger import LedgerConfig

    # pinned to this node (the head): its store is this disk's, its port this host's, and
    # an actor asking for no resources would otherwise be placed (and restarted) anywhere
    node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    handle = RegistryActor.options(
        name=REGISTRY_NAME, namespace=namespace, lifetime="detached", get_if_exists=True,
        scheduling_strategy=node,
    ).remote(dataclasses.asdict(config))
    ledger_actor.deploy(config.state_dir, LedgerConfig(), namespace, timeout_s)
    info = ray.get(handle.ready.remote(), timeout=timeout_s)
    return handle, info


def find(namespace: str = "meshd") -> Any | None:
    try:
        return ray.get_actor(REGISTRY_NAME, namespace=namespace)
    except ValueError:
        return None


def stop(namespace: str = "meshd", timeout_s: float = 10.0) -> bool:
    """Stop the registry and the ledger cleanly and remove them; False when no registry was
    running."""
    from meshd.coordinator import ledger_actor

    ledger_actor.stop(namespace, timeout_s)
    return stop_actor(find(namespace), "shutdown", timeout_s)


def stop_actor(handle: Any | None, method: str, timeout_s: float) -> bool:
    """Call `method` on a named actor to stop it cleanly, then remove it (no restart);
    False when `handle` is None (none was running)."""
    if handle is None:
        return False
    try:
        ray.get(getattr(handle, method).remote(), timeout=timeout_s)
    except Exception as e:  # it may already be dying; kill it regardless
        log.warning("%s %s: %s", handle, method, e)
    ray.kill(handle, no_restart=True)
    return True
