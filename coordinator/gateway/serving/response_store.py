"""`ResponseStore`: stored responses for the Responses API's `previous_response_id`.

Bounded three ways: at most `max_entries` responses and `max_bytes` of them (the caller's
`size` for each, e.g. its serialized length), least recently used evicted first, in O(1); and
each expires `ttl_s` after it was stored (lazily: a `get` of an expired one removes it, and
every `put` removes the expired oldest). A response belongs to the tenant that stored it: for
any other tenant `get` and `delete` act as if it did not exist (`tenant=None` is its own
tenant, for gateways without keys).

Pure data, no I/O; the clock is passed in and must not go backwards. Not thread-safe: one
event loop owns it. Values are kept by reference, never copied.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class _Entry:
    value: object
    size: int
    tenant: str | None
    expires: float


@dataclass(frozen=True, slots=True)
class ResponseStoreStats:
    entries: int
    bytes_used: int
    evicted: int  # removed for room (entries or bytes)
    expired: int  # removed past their TTL
    refused: int  # puts refused: larger than max_bytes, or the id is another tenant's


class ResponseStore:
    __slots__ = ("_by_age", "_bytes", "_clock", "_lru", "evicted", "expired", "max_bytes",
                 "max_entries", "refused", "ttl_s")

    def __init__(self, max_entries: int, max_bytes: int, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._lru: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._by_age: OrderedDict[str, None] = OrderedDict()  # oldest put first
        self._bytes = 0
        self.evicted = 0
        self.expired = 0
        self.refused = 0

    def __len__(self) -> int:
        """Entries held, counting expired ones not yet removed."""
        return len(self._lru)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def put(self, response_id: str, value: object, size: int, *, tenant: str | None) -> bool:
        """Store `value` (replacing the tenant's own entry of that id); False, storing nothing,
        if `size` exceeds `max_bytes` or the id is held by another tenant."""
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        now = self._clock()
        self._sweep(now)
        old = self._lru.get(response_id)
        if size > self.max_bytes or (old is not None and old.tenant != tenant):
            self.refused += 1
            return False
        if old is not None:
            self._remove(response_id)
        while self._lru and (len(self._lru) >= self.max_entries
                             or self._bytes + size > self.max_bytes):
            self._remove(next(iter(self._lru)))
            self.evicted += 1
        self._lru[response_id] = _Entry(value, size, tenant, now + self.ttl_s)
        self._by_age[response_id] = None
        self._bytes += size
        return True

    def get(self, response_id: str, *, tenant: str | None) -> object | None:
        """The value stored under `response_id` by `tenant`, now the most recently used; None
        if there is none, it expired, or another tenant stored it."""
        entry = self._lru.get(response_id)
        if entry is None:
            return None
        if entry.expires <= self._clock():
            self._remove(response_id)
            self.expired += 1
            return None
        if entry.tenant != tenant:
            return None
        self._lru.move_to_end(response_id)
        return entry.value

    def delete(self, response_id: str, *, tenant: str | None) -> bool:
        """Remove `tenant`'s entry `response_id`; False if it has none of that id."""
        entry = self._lru.get(response_id)
        if entry is None or entry.tenant != tenant:
            return False
        self._remove(response_id)
        return True

    def stats(self) -> ResponseStoreStats:
        return ResponseStoreStats(len(self._lru), self._bytes, self.evicted, self.expired,
                                  self.refused)

    def check_integrity(self) -> None:
        """Both orders hold the same ids, the byte count is their sum, the bounds hold, and
        ages are in put order."""
        assert self._lru.keys() == self._by_age.keys()
        assert self._bytes == sum(e.size for e in self._lru.values())
        assert len(self._lru) <= self.max_entries and self._bytes <= self.max_bytes
        expiries = [self._lru[k].expires for k in self._by_age]
        assert expiries == sorted(expiries)

    def _sweep(self, now: float) -> None:
        while self._by_age:
            oldest = next(iter(self._by_age))
            if self._lru[oldest].expires > now:
                return
            self._remove(oldest)
            self.expired += 1

    def _remove(self, response_id: str) -> None:
        entry = self._lru.pop(response_id)
        del self._by_age[response_id]
        self._bytes -= entry.size
