"""Weighted fair queueing with strict priority classes for the gateway (VTC).

After Sheng et al., OSDI'24 (the Virtual Token Counter). A tenant's counter is the service it was
charged (`service(prompt, completion)` units) divided by its weight. A freed slot goes to the
lowest-numbered non-empty priority class; within it to the backlogged tenant with the least
counter (ties: the one admitted least recently); FIFO within a tenant.

Counter lift: a tenant whose queue in a class goes from empty to non-empty is raised to at least
the least counter of that class's backlogged tenants, or with none to the floor (which never
falls: it rises to the least counter of the other running tenants at such a lift). An idle tenant
(nothing queued or running) never stands below the floor, so idleness banks no credit; at the
floor it is forgotten (new tenants start there); past `max_tenants`, idle ones go LRU first.

Plain data: the clock is passed in and must be monotonic (deadlines are kept in enqueue order);
no I/O, no locks: one event loop owns it. `item` is opaque (the gateway's asyncio.Future).
"""

from __future__ import annotations

import heapq
import math
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

# A heap entry: (counter, tick of last admission, tenant, version). Live iff its version is the
# backlog's current one; stale entries are dropped lazily when they reach the top.
_Key = tuple[float, int, str, int]
_INF = math.inf


@dataclass(frozen=True, slots=True)
class FairConfig:
    max_active: int = 0  # requests this replica runs at once before queueing (0: no limit)
    max_queued: int = 1024  # queued requests across all tenants (past it: refuse)
    queue_timeout_s: float = 30.0
    input_weight: float = 1.0  # VTC w_p: service per prompt token
    output_weight: float = 2.0  # VTC w_q: service per completion token
    max_tenants: int = 10_000  # tenants tracked at most (idle ones evicted LRU first)

    def __post_init__(self) -> None:
        rules = (
            ("max_active", self.max_active >= 0, ">= 0"),
            ("max_queued", self.max_queued >= 1, ">= 1"),
            ("queue_timeout_s", 0 < self.queue_timeout_s < math.inf, "> 0 and finite"),
            ("input_weight", 0 <= self.input_weight < math.inf, ">= 0 and finite"),
            ("output_weight", 0 <= self.output_weight < math.inf, ">= 0 and finite"),
            ("max_tenants", self.max_tenants >= 1, ">= 1"),
        )
        for name, ok, rule in rules:
            if not ok:
                got = getattr(self, name)
                raise ValueError(f"gateway.governance.fair.{name}: must be {rule} (got {got!r})")


@dataclass(frozen=True, slots=True, eq=False)
class Ticket(Generic[T]):
    """A queued request: the handle `cancel` takes. `cost` is charged when it is dispatched."""

    tenant: str
    priority: int
    seq: int
    deadline: float
    cost: float
    item: T


class _Backlog(Generic[T]):
    __slots__ = ("entries", "version")

    def __init__(self) -> None:
        self.entries: OrderedDict[int, Ticket[T]] = OrderedDict()  # seq -> ticket, FIFO
        self.version = 0


class _Tenant(Generic[T]):
    __slots__ = ("active", "backlogs", "counter", "last", "name", "queued", "weight")

    def __init__(self, name: str, counter: float) -> None:
        self.name = name
        self.counter = counter
        self.weight = 1.0  # the latest request's weight
        self.active = 0
        self.queued = 0
        self.last = 0  # tick of the latest admission (0: never admitted)
        self.backlogs: dict[int, _Backlog[T]] = {}  # priority -> its queue in that class


class _Class(Generic[T]):
    __slots__ = ("backlogs", "heap")

    def __init__(self) -> None:
        self.backlogs: dict[str, _Backlog[T]] = {}  # non-empty backlogs only
        self.heap: list[_Key] = []


def _check_request(weight: float, cost: float) -> None:
    if not 0 < weight < math.inf or not 0 <= cost < math.inf:
        raise ValueError(f"fair queue: weight must be > 0 and cost >= 0 (got {weight}, {cost})")


class FairQueue(Generic[T]):
    """Admission slots plus the queue in front of them. Invariant: a free slot implies an empty
    queue, so `try_enter` never overtakes a queued request. Protocol: `try_enter`; if refused,
    `enqueue`; each admitted request (either way) ends with exactly one `release`."""

    def __init__(self, config: FairConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self._clock = clock
        self._limit = config.max_active or sys.maxsize
        self.active = 0  # requests admitted and not yet released
        self._tenants: OrderedDict[str, _Tenant[T]] = OrderedDict()  # LRU order
        self._running: dict[str, _Tenant[T]] = {}  # tenants with active > 0
        self._classes: dict[int, _Class[T]] = {}  # non-empty classes only
        self._queued: OrderedDict[int, Ticket[T]] = OrderedDict()  # seq -> ticket, by deadline
        self._floor = 0.0
        self._seq = 0  # ticket seqs and heap-entry versions
        self._tick = 0  # admissions, for least-recently-admitted tie-breaks

    def service(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Service units of a request: the `cost` and `actual_service` the other calls take."""
        return (self.config.input_weight * prompt_tokens
                + self.config.output_weight * completion_tokens)

    def try_enter(self, tenant: str, priority: int, weight: float, cost: float) -> bool:
        """Admit at once if a slot is free and nothing is queued: counts the slot and charges
        `cost / weight` to the tenant. O(1). `priority` matters only once requests queue."""
        if self.active >= self._limit or self._queued:
            return False
        if not (0 < weight < _INF and 0 <= cost < _INF):
            _check_request(weight, cost)
        # _use and _admit, inlined: this runs on every request
        t = self._tenants.get(tenant)
        if t is None:
            t = self._use(tenant, weight)
        else:
            self._tenants.move_to_end(tenant)
            t.weight = weight
        t.counter += cost / weight
        self._tick += 1
        t.last = self._tick
        if not t.active:
            self._running[tenant] = t
        t.active += 1
        self.active += 1
        return True

    def enqueue(self, tenant: str, priority: int, weight: float, cost: float,
                item: T) -> Ticket[T] | None:
        """Queue `item` (only after `try_enter` refused: ValueError if it would have admitted).
        None when `max_queued` requests are queued already. O(log n)."""
        _check_request(weight, cost)
        if self.active < self._limit and not self._queued:
            raise ValueError("fair queue: enqueue with a free slot; call try_enter first")
        if len(self._queued) >= self.config.max_queued:
            return None
        t = self._use(tenant, weight)
        self._seq += 1
        ticket = Ticket(tenant, priority, self._seq, self._clock() + self.config.queue_timeout_s,
                        cost, item)
        backlog = t.backlogs.get(priority)
        if backlog is None:
            self._lift(t, priority)
            backlog = _Backlog()
            self._classes.setdefault(priority, _Class()).backlogs[tenant] = backlog
            t.backlogs[priority] = backlog
            self._touch(t)
        backlog.entries[ticket.seq] = ticket
        t.queued += 1
        self._queued[ticket.seq] = ticket
        return ticket

    def release(self, tenant: str, actual_service: float, charged: float) -> list[T]:
        """A running request ended: frees its slot and corrects the tenant's counter by
        `(actual_service - charged) / weight` (the tenant's current weight; a downward correction
        stops at the floor). Returns the items dispatched into the free slots, in order, each now
        active with its cost charged: the caller resolves them."""
        t = self._tenants.get(tenant)
        if t is None or not t.active:
            raise ValueError(f"fair queue: release for {tenant!r}, which has no active request")
        if not (0 <= actual_service < _INF and 0 <= charged < _INF):
            raise ValueError(f"fair queue: service must be >= 0 (got {actual_service}, {charged})")
        delta = (actual_service - charged) / t.weight
        if delta:
            moved = t.counter + delta
            t.counter = moved if delta > 0 else max(moved, min(t.counter, self._floor))
            if t.backlogs:
                self._touch(t)
        t.active -= 1
        self.active -= 1
        if not t.active:
            del self._running[tenant]
            self._maybe_forget(t)
        out: list[T] = []
        while self.active < self._limit and self._queued:
            out.append(self._pop_next().item)
        return out

    def cancel(self, ticket: Ticket[T]) -> bool:
        """Remove a queued entry (its waiter left). True if it was still queued."""
        if self._queued.get(ticket.seq) is not ticket:
            return False
        self._remove(ticket)
        return True

    def expired(self) -> list[T]:
        """Pop the queued entries whose deadline has passed (deadline <= now), oldest first."""
        now = self._clock()
        out: list[T] = []
        while self._queued:
            ticket = next(iter(self._queued.values()))
            if ticket.deadline > now:
                break
            self._remove(ticket)
            out.append(ticket.item)
        return out

    def depth(self, tenant: str | None = None) -> int:
        """Queued requests: all of them, or one tenant's (across classes)."""
        if tenant is None:
            return len(self._queued)
        t = self._tenants.get(tenant)
        return t.queued if t is not None else 0

    def counters(self) -> dict[str, float]:
        """Virtual counters of the tracked tenants (service units per unit of weight)."""
        return {name: t.counter for name, t in self._tenants.items()}

    @property
    def floor(self) -> float:
        return self._floor

    def _use(self, name: str, weight: float) -> _Tenant[T]:
        t = self._tenants.get(name)
        if t is None:
            if len(self._tenants) >= self.config.max_tenants:
                self._evict_idle()
            t = self._tenants[name] = _Tenant(name, self._floor)
        else:
            self._tenants.move_to_end(name)
        t.weight = weight
        return t

    def _evict_idle(self) -> None:
        for _ in range(len(self._tenants)):
            name, t = next(iter(self._tenants.items()))
            if not t.active and not t.queued:
                del self._tenants[name]
                return
            self._tenants.move_to_end(name)  # busy tenants are never evicted

    def _maybe_forget(self, t: _Tenant[T]) -> None:
        if t.active or t.queued:
            return
        if t.counter <= self._floor:
            del self._tenants[t.name]
        elif len(self._tenants) > self.config.max_tenants:  # over the cap while all were busy
            self._evict_idle()

    def _admit(self, t: _Tenant[T], cost: float) -> None:
        t.counter += cost / t.weight
        self._tick += 1
        t.last = self._tick
        if not t.active:
            self._running[t.name] = t
        t.active += 1
        self.active += 1

    def _lift(self, t: _Tenant[T], priority: int) -> None:
        cls = self._classes.get(priority)
        if cls is not None:
            level = self._top(cls)[0]
        else:
            others = [o.counter for o in self._running.values() if o is not t]
            if others:
                self._floor = max(self._floor, min(others))
            level = self._floor
        if not t.active and not t.backlogs:
            level = max(level, self._floor)
        t.counter = max(t.counter, level)

    def _top(self, cls: _Class[T]) -> tuple[float, str, _Backlog[T]]:
        heap = cls.heap
        while True:
            counter, _, name, version = heap[0]
            backlog = cls.backlogs.get(name)
            if backlog is not None and backlog.version == version:
                return counter, name, backlog
            heapq.heappop(heap)

    def _touch(self, t: _Tenant[T]) -> None:
        """Re-key the tenant in every class it is backlogged in (its counter or tick changed)."""
        for priority, backlog in t.backlogs.items():
            self._seq += 1
            backlog.version = self._seq
            cls = self._classes[priority]
            heapq.heappush(cls.heap, (t.counter, t.last, t.name, self._seq))
            if len(cls.heap) > 2 * len(cls.backlogs) + 32:
                cls.heap = [(self._tenants[n].counter, self._tenants[n].last, n, b.version)
                            for n, b in cls.backlogs.items()]
                heapq.heapify(cls.heap)

    def _pop_next(self) -> Ticket[T]:
        priority = min(self._classes)
        _, name, backlog = self._top(self._classes[priority])
        ticket = backlog.entries.popitem(last=False)[1]
        del self._queued[ticket.seq]
        t = self._tenants[name]
        t.queued -= 1
        if not backlog.entries:
            self._drop_backlog(t, priority)
        self._admit(t, ticket.cost)
        if t.backlogs:
            self._touch(t)
        return ticket

    def _remove(self, ticket: Ticket[T]) -> None:
        del self._queued[ticket.seq]
        t = self._tenants[ticket.tenant]
        backlog = t.backlogs[ticket.priority]
        del backlog.entries[ticket.seq]
        t.queued -= 1
        if not backlog.entries:
            self._drop_backlog(t, ticket.priority)
        self._maybe_forget(t)

    def _drop_backlog(self, t: _Tenant[T], priority: int) -> None:
        del t.backlogs[priority]
        cls = self._classes[priority]
        del cls.backlogs[t.name]
        if not cls.backlogs:
            del self._classes[priority]

    def check_integrity(self) -> None:
        """Raise AssertionError if slots, queues, heaps and tenant records disagree."""
        assert 0 <= self.active <= self._limit
        assert self.active == sum(t.active for t in self._tenants.values())
        assert self._running == {n: t for n, t in self._tenants.items() if t.active}
        assert not self._queued or self.active >= self._limit, "free slot with a queue"
        assert len(self._queued) <= self.config.max_queued
        assert list(self._queued) == sorted(self._queued)
        busy = sum(1 for t in self._tenants.values() if t.active or t.queued)
        assert len(self._tenants) <= max(self.config.max_tenants, busy)
        for name, t in self._tenants.items():
            assert t.name == name and t.weight > 0 and t.counter >= 0
            assert t.queued == sum(len(b.entries) for b in t.backlogs.values())
            for priority, backlog in t.backlogs.items():
                assert self._classes[priority].backlogs[name] is backlog and backlog.entries
                for seq, ticket in backlog.entries.items():
                    assert self._queued[seq] is ticket and ticket.tenant == name
        assert len(self._queued) == sum(t.queued for t in self._tenants.values())
        for priority, cls in self._classes.items():
            assert cls.backlogs
            live = [k for k in cls.heap if (b := cls.backlogs.get(k[2])) and b.version == k[3]]
            assert sorted(k[2] for k in live) == sorted(cls.backlogs), f"class {priority}: heap"
            for counter, last, name, _ in live:
                t = self._tenants[name]
                assert t.backlogs[priority] is cls.backlogs[name]
                assert (counter, last) == (t.counter, t.last), f"{name}: stale live heap key"
