"""Prefill-side block leases: the blocks a prefill engine holds for decode peers, a `BlockSource`.

One implementation for the embedded engine (through `disagg.EngineLeases`) and meshd's vLLM
connector. A lease is keyed by the prefill engine's internal request id (`remote_request_id`)
and ends exactly once, for one of three reasons:

- `sent`: the peer confirmed an intact copy (`on_sent`, a transport thread);
- `expired`: its deadline passed (`expire`, or `take_done` which calls it);
- `released`: the engine dropped it without a transfer (`release`, e.g. an abort).

**Renew rule.** A lease is granted until `now + timeout_s`. A `lookup` (a fetch starting)
renews it to at least `now + transfer_timeout_s + RENEW_MARGIN_S`, where `transfer_timeout_s`
is the serving transport's per-connection transfer deadline (`conn.ServerConfig`): the server
gives up on the transfer before the lease can end, so blocks are never freed under a transfer
in flight. A renewal never shortens a deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

RENEW_MARGIN_S = 1.0
ENDED_MEMORY = 4096  # ended ids remembered so a late lookup does not wait for a grant
END_REASONS = ("sent", "expired", "released")


@dataclass(slots=True)
class LeaseStats:
    granted: int = 0
    sent: int = 0
    expired: int = 0
    released: int = 0
    lookups_missed: int = 0  # lookups that found no lease (unknown, ended, or late grant)


class LeaseTable:
    """Held blocks by request id, with deadlines. A thread-safe `BlockSource`.

    Threads: `grant`, `release`, `expire` and `take_done` run on the engine's thread,
    `lookup`/`on_sent` on transport threads. `lookup` waits up to `lookup_wait_s` for a grant
    still on its way (vLLM's decode side can be faster than the prefill engine's next step;
    0 disables the wait) and never for an id whose lease already ended.

    Ended leases are reported once each, either pushed to `on_end(request_id, why)` (`why` in
    `END_REASONS`), called OUTSIDE this table's lock on the thread that ended the lease, or,
    without `on_end`, queued for `take_done`. The callback may take other locks (the engine's);
    the table never calls out while holding its own lock.
    """

    def __init__(self, timeout_s: float, *, transfer_timeout_s: float,
                 lookup_wait_s: float = 0.0,
                 on_end: Callable[[str, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if timeout_s <= 0 or transfer_timeout_s <= 0 or lookup_wait_s < 0:
            raise ValueError("timeout_s and transfer_timeout_s must be > 0, lookup_wait_s >= 0")
        self._timeout_s, self._wait_s = timeout_s, lookup_wait_s
        self._renew_s = transfer_timeout_s + RENEW_MARGIN_S
        self._on_end, self._clock = on_end, clock
        self._cond = threading.Condition()
        self._held: dict[str, tuple[tuple[int, ...], float]] = {}
        self._ended: dict[str, None] = {}  # insertion-ordered, at most ENDED_MEMORY
        self._done: set[str] = set()  # for take_done (only without on_end)
        self._stats = LeaseStats()

    def __len__(self) -> int:
        with self._cond:
            return len(self._held)

    def get(self, request_id: str) -> tuple[int, ...] | None:
        """The blocks held for `request_id`, without renewing or waiting."""
        with self._cond:
            entry = self._held.get(request_id)
        return entry[0] if entry else None

    def held(self) -> dict[str, tuple[int, ...]]:
        with self._cond:
            return {rid: blocks for rid, (blocks, _) in self._held.items()}

    def stats(self) -> LeaseStats:
        """A consistent copy of the counters."""
        with self._cond:
            return replace(self._stats)

    def grant(self, request_id: str, block_ids: Iterable[int],
              expires_at: float | None = None) -> None:
        with self._cond:
            at = self._clock() + self._timeout_s if expires_at is None else expires_at
            self._held[request_id] = (tuple(block_ids), at)
            self._ended.pop(request_id, None)
            self._stats.granted += 1
            self._cond.notify_all()

    def lookup(self, request_id: str) -> list[int] | None:
        end = self._clock() + self._wait_s
        with self._cond:
            while True:
                entry = self._held.get(request_id)
                if entry is not None:
                    renewed = max(entry[1], self._clock() + self._renew_s)
                    self._held[request_id] = (entry[0], renewed)
                    return list(entry[0])
                left = end - self._clock()
                if left <= 0 or request_id in self._ended:
                    self._stats.lookups_missed += 1
                    return None
                self._cond.wait(min(left, 0.05))

    def on_sent(self, request_id: str) -> None:
        self._end([request_id], "sent")

    def release(self, request_id: str) -> None:
        """End a lease without a transfer (e.g. the engine aborted the request)."""
        self._end([request_id], "released")

    def expire(self) -> list[str]:
        """End the leases past their deadline; returns their ids."""
        now = self._clock()
        with self._cond:
            gone = [rid for rid, (_, at) in self._held.items() if at <= now]
        return self._end(gone, "expired") if gone else []

    def take_done(self) -> set[str]:
        """Without `on_end`: ids whose lease ended since the last call (after `expire()`)."""
        self.expire()
        with self._cond:
            done, self._done = self._done, set()
        return done

    def _end(self, request_ids: list[str], why: str) -> list[str]:
        ended = []
        with self._cond:
            for rid in request_ids:
                if self._held.pop(rid, None) is None:
                    continue  # already ended: each lease ends once
                ended.append(rid)
                self._ended[rid] = None
                if self._on_end is None:
                    self._done.add(rid)
            while len(self._ended) > ENDED_MEMORY:
                del self._ended[next(iter(self._ended))]
            assert why in END_REASONS, why
            setattr(self._stats, why, getattr(self._stats, why) + len(ended))
            if ended:
                self._cond.notify_all()  # waiting lookups stop waiting for an ended id
        if self._on_end is not None:
            for rid in ended:
                self._on_end(rid, why)
        return ended
