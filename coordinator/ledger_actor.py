"""The fleet ledger as one named, detached Ray actor, and the clients gateway replicas use.

`LocalLedger` is the ledger itself: `LedgerState` plus its `LedgerStore` (or memory only) and
the wall clock. `LedgerActor` (name `meshd-ledger`) hosts one in a plain, synchronous Ray actor
with `max_concurrency=1`, so calls run one at a time and every sync is atomic. It persists to
`<state_dir>/ledger.db`; Ray restarts it if it dies (`max_restarts=-1`) and the new instance
reloads the file. Calls are not retried by Ray (`max_task_retries=0`): a sync is not
idempotent (its `consumed` is added), so a call lost to a restart fails and the replica decides.

`deploy` pins the actor to the node it is called from (the one holding `state_dir`): a
restart elsewhere would start from an empty ledger. On the Ray dashboard it shows with a repr
naming its file; its figures (replicas, meters, syncs, save failures: `ray_figures.py`) go
through `ray.util.metrics`, copied after a sync at most every few seconds (nothing changes
between syncs).

Replicas talk to it through a `LedgerClient`: `RayLedgerClient` awaits the actor (a timeout
or actor failure raises `LedgerUnavailable`); `InProcessLedgerClient` calls a `LocalLedger`
directly, for a single-process gateway and tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from meshd.coordinator.ledger_store import (
    LEDGER_DB,
    USAGE_COUNTERS,
    USAGE_KEYS,
    LedgerStore,
    usage_row,
)
from meshd.coordinator.ray_figures import LEDGER_SPECS, ledger_samples
from meshd.coordinator.ray_metrics import RayMetricsBridge, ThrottledCopy
from meshd.scheduler.admission.ledger import (
    Changes,
    LedgerConfig,
    LedgerState,
    SyncReply,
    SyncRequest,
    UsageDelta,
)

LEDGER_NAME = "meshd-ledger"
log = logging.getLogger("meshd.coordinator.ledger")


class LedgerUnavailable(Exception):
    """The ledger did not answer in time or its actor failed; the replica falls back."""


class LocalLedger:
    """The ledger: `sync` applies a replica's report and persists what it touched.

    Synchronous, one caller at a time. With no store, state and usage live in memory only.
    A failed save does not fail the sync (the state has applied it): it is logged, counted
    in `save_failures`, and what it would have written is written with the next successful
    save."""

    def __init__(self, config: LedgerConfig | None = None, store: LedgerStore | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config or LedgerConfig()
        self.store = store
        self.clock = clock
        self.state = store.load(self.config) if store else LedgerState(self.config)
        self.syncs = 0
        self.save_failures = 0
        self._totals: dict[tuple[str, str, str], list[int]] = {}  # memory-only usage
        self._unsaved: tuple[Changes, list[UsageDelta]] | None = None

    def sync(self, req: SyncRequest) -> SyncReply:
        reply = self.state.sync(req, self.clock())
        self.syncs += 1
        changes = self.state.changes()
        fresh = req.usage if reply.usage_accepted else ()  # a resent batch is not added twice
        if self.store is None:
            self._add_usage(fresh)
            return reply
        usage = list(fresh)
        if self._unsaved is not None:
            changes, usage = _merge(self._unsaved[0], changes), self._unsaved[1] + usage
        try:
            self.store.save(self.state, changes, usage)
        except Exception:
            self.save_failures += 1
            self._unsaved = changes, usage
            log.exception("ledger save failed (%d so far); kept for the next save",
                          self.save_failures)
        else:
            self._unsaved = None
        return reply

    def usage(self, tenant: str | None = None, since: str | None = None,
              until: str | None = None) -> list[dict[str, Any]]:
        """Rows per (day, tenant, model), ordered; `since`/`until` inclusive days."""
        if self.store is not None:
            return self.store.usage(tenant, since, until)
        return [dict(zip(USAGE_KEYS + USAGE_COUNTERS, (*k, *v), strict=True))
                for k, v in sorted(self._totals.items())
                if (tenant is None or k[1] == tenant) and (since is None or k[0] >= since)
                and (until is None or k[0] <= until)]

    def meters(self, prefix: str = "") -> list[dict[str, Any]]:
        """Every meter whose key starts with `prefix`, ordered by key."""
        return [{"key": m.key, "kind": m.kind.name.lower(), "limit": m.limit,
                 "committed": m.committed, "outstanding": m.outstanding,
                 "free": m.limit - m.committed - m.outstanding}
                for key, m in sorted(self.state.meters.items()) if key.startswith(prefix)]

    def stats(self) -> dict[str, int]:
        s = self.state
        return {"replicas": len(s.replicas), "meters": len(s.meters),
                "expired_total": s.expired_total, "charged_on_expiry": s.charged_on_expiry,
                "syncs": self.syncs, "save_failures": self.save_failures}

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def _add_usage(self, usage: Iterable[UsageDelta]) -> None:
        for u in usage:
            row = usage_row(u)
            acc = self._totals.setdefault((u.day, u.tenant, u.model), [0] * len(USAGE_COUNTERS))
            for i, value in enumerate(row[3:]):
                acc[i] += int(value)


def _merge(a: Changes, b: Changes) -> Changes:
    return Changes(a.meters | b.meters, a.replicas | b.replicas,
                   a.dropped_meters | b.dropped_meters, a.dropped_replicas | b.dropped_replicas)


class _LedgerActor:
    def __init__(self, state_dir: str, config: dict[str, Any]) -> None:
        logging.basicConfig(level=logging.INFO)
        self.path = Path(state_dir).expanduser() / LEDGER_DB
        self.ledger = LocalLedger(LedgerConfig(**config), LedgerStore(self.path))
        ledger = self.ledger
        self._figures = ThrottledCopy(RayMetricsBridge(
            LEDGER_NAME, LEDGER_SPECS, lambda: ledger_samples(ledger.stats())))
        self._figures()

    def __repr__(self) -> str:
        """What the Ray dashboard shows (read once, when the actor starts)."""
        return f"meshd fleet ledger: {getattr(self, 'path', '(starting)')}"

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "path": str(self.path)}

    def sync(self, req: SyncRequest) -> SyncReply:
        reply = self.ledger.sync(req)
        self._figures()
        return reply

    def usage(self, tenant: str | None = None, since: str | None = None,
              until: str | None = None) -> list[dict[str, Any]]:
        return self.ledger.usage(tenant, since, until)

    def meters(self, prefix: str = "") -> list[dict[str, Any]]:
        return self.ledger.meters(prefix)

    def stats(self) -> dict[str, int]:
        return self.ledger.stats()

    def close(self) -> None:
        self.ledger.close()


# Ray's stubs lack `max_concurrency`; 1 makes every call, so every sync, atomic.
LedgerActor: Any = ray.remote(  # type: ignore[call-overload]
    num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=1)(_LedgerActor)


def deploy(state_dir: str, config: LedgerConfig, namespace: str = "meshd",
           timeout_s: float = 60.0) -> Any:
    """Create (or find) the ledger actor, pinned to this node, and wait until it is loaded.

    Raises ValueError when the running one persists somewhere other than `state_dir`."""
    directory = Path(state_dir).expanduser().resolve()  # the actor's cwd is not ours
    path = str(directory / LEDGER_DB)
    node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    handle = LedgerActor.options(
        name=LEDGER_NAME, namespace=namespace, lifetime="detached", get_if_exists=True,
        scheduling_strategy=node,
    ).remote(str(directory), dataclasses.asdict(config))
    info = ray.get(handle.ready.remote(), timeout=timeout_s)
    if info["path"] != path:
        raise ValueError(f"a ledger in namespace {namespace!r} already persists to "
                         f"{info['path']}, not {path}; stop it first")
    return handle


def find(namespace: str = "meshd") -> Any | None:
    try:
        return ray.get_actor(LEDGER_NAME, namespace=namespace)
    except ValueError:
        return None


def stop(namespace: str = "meshd", timeout_s: float = 10.0) -> bool:
    """Close the ledger's store and remove the actor; False when none was running."""
    from meshd.coordinator.actors import stop_actor  # actors deploys the ledger: no cycle

    return stop_actor(find(namespace), "close", timeout_s)


class LedgerClient(Protocol):
    """How a gateway replica reaches the ledger. Each call raises `LedgerUnavailable` when the
    ledger cannot answer; a sync that raised may still have been applied."""

    async def sync(self, req: SyncRequest) -> SyncReply: ...

    async def usage(self, tenant: str | None = None, since: str | None = None,
                    until: str | None = None) -> list[dict[str, Any]]: ...

    async def meters(self, prefix: str = "") -> list[dict[str, Any]]: ...


class RayLedgerClient:
    """The ledger actor behind `handle`; every call waits at most `timeout_s`."""

    def __init__(self, handle: Any, timeout_s: float) -> None:
        self.handle = handle
        self.timeout_s = timeout_s

    async def sync(self, req: SyncRequest) -> SyncReply:
        reply: SyncReply = await self._call("sync", req)
        return reply

    async def usage(self, tenant: str | None = None, since: str | None = None,
                    until: str | None = None) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await self._call("usage", tenant, since, until)
        return rows

    async def meters(self, prefix: str = "") -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await self._call("meters", prefix)
        return rows

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            ref = getattr(self.handle, method).remote(*args)
            return await asyncio.wait_for(ref, self.timeout_s)
        except TimeoutError:
            raise LedgerUnavailable(
                f"ledger {method}: no answer within {self.timeout_s:g}s") from None
        except ray.exceptions.RayError as e:
            raise LedgerUnavailable(f"ledger {method}: {type(e).__name__}: {e}") from e


class InProcessLedgerClient:
    """A `LedgerClient` over a `LocalLedger` in this process: direct calls (with a store, a
    sync blocks the loop for its save, about a millisecond)."""

    def __init__(self, ledger: LocalLedger) -> None:
        self.ledger = ledger

    async def sync(self, req: SyncRequest) -> SyncReply:
        return self.ledger.sync(req)

    async def usage(self, tenant: str | None = None, since: str | None = None,
                    until: str | None = None) -> list[dict[str, Any]]:
        return self.ledger.usage(tenant, since, until)

    async def meters(self, prefix: str = "") -> list[dict[str, Any]]:
        return self.ledger.meters(prefix)
