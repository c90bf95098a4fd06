"""The replica's link to the fleet ledger: one background task that syncs its `LeaseBook`.

Every `sync_interval_s` the keeper sends the book's report (with the usage accumulated since)
and applies the answer; `urgent()` asks for a sync now and waits for it — what a reservation
that did not fit the leases awaits, coalesced so that a burst of such requests shares one round
trip. Nothing is lost or counted twice when a sync fails, even one the ledger applied but whose
answer never came: consumption is reported cumulatively, and a usage batch is numbered and
sent again as it was until the ledger has it. The leases stay usable until their own deadline
(`LeaseBook.valid`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from meshd.coordinator.ledger_actor import LedgerClient
from meshd.scheduler.admission.leases import LeaseBook
from meshd.scheduler.admission.ledger import UsageDelta

log = logging.getLogger("meshd.gateway.governance")


class UsageBuffer:
    """Usage per (day, tenant, model) since the last sync that reached the ledger, and per
    tenant since start (what was taken plus what is buffered: the metrics' counters)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, str], list[int]] = {}
        self._taken: dict[str, list[int]] = {}  # tenant -> prompt, cached, completion, spend

    def add(self, day: str, tenant: str, model: str, requests: int, prompt: int, cached: int,
            completion: int, spend: int, refused: int = 0) -> None:
        row = self.rows.get((day, tenant, model))
        if row is None:
            row = self.rows[(day, tenant, model)] = [0, 0, 0, 0, 0, 0]
        row[0] += requests
        row[1] += prompt
        row[2] += cached
        row[3] += completion
        row[4] += spend
        row[5] += refused

    def take(self) -> tuple[UsageDelta, ...]:
        out = tuple(UsageDelta(d, t, m, *row) for (d, t, m), row in self.rows.items())
        self._fold(self._taken, self.rows)
        self.rows = {}
        return out

    def totals(self) -> dict[str, list[int]]:
        """tenant -> [prompt, cached, completion, spend] since start."""
        out = {t: list(v) for t, v in self._taken.items()}
        self._fold(out, self.rows)
        return out

    @staticmethod
    def _fold(into: dict[str, list[int]], rows: dict[tuple[str, str, str], list[int]]) -> None:
        for (_, tenant, _), row in rows.items():
            acc = into.setdefault(tenant, [0, 0, 0, 0])
            for i in range(4):
                acc[i] += row[i + 1]


class Keeper:
    def __init__(self, book: LeaseBook, client: LedgerClient, usage: UsageBuffer,
                 interval_s: float, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.book, self.client, self.usage = book, client, usage
        self.interval_s = interval_s
        self.clock, self.wall = clock, wall
        self.syncs = self.failures = 0
        self.last_error = ""
        self.last_ok = 0.0
        self._lock = asyncio.Lock()
        self._batch: tuple[int, tuple[UsageDelta, ...]] = (0, ())  # sent until acknowledged
        self._seq = 0
        self._inflight: asyncio.Future[bool] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.sync()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):  # hand back leases, report the last usage
            await asyncio.wait_for(self.sync(), 2.0)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.sync()

    async def urgent(self, timeout_s: float) -> bool:
        """A sync now (or the one in flight, if it has not sent yet); False if it failed or
        did not finish in `timeout_s`."""
        fut = self._inflight
        if fut is None or fut.done():
            fut = self._inflight = asyncio.ensure_future(self.sync())
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except TimeoutError:
            return False

    async def sync(self) -> bool:
        async with self._lock:
            book = self.book
            book.forget(self.wall())
            req = book.report()
            if not self._batch[1] and self.usage.rows:
                self._seq += 1
                self._batch = (self._seq, self.usage.take())
            seq, usage = self._batch
            if not req.meters and not usage and book.epoch:
                return True
            sent_at = self.clock()
            try:
                reply = await self.client.sync(replace(req, usage=usage, usage_seq=seq))
            except Exception as e:  # unreachable or failing: the same batch goes next time
                self.failures += 1
                if str(e) != self.last_error:
                    log.warning("fleet ledger sync failed: %s", e)
                self.last_error = str(e)
                return False
            book.apply(reply, sent_at)
            self._batch = (seq, ())
            self.syncs += 1
            self.last_ok = sent_at
            self.last_error = ""
            return True
