"""The fleet ledger: the one authority on how much of every limit is used and leased out.

Every gateway replica holds *leases* on the meters its tenants need (a meter is one limit in
one window: `acme`'s requests this minute, its spend today, the fleet's tokens this 10 s) and
reserves against them locally; the ledger grants those leases so that, for every meter,

    committed + sum(outstanding lease of every replica) <= limit

where `outstanding` is what a replica holds, reserved for running requests (`inflight`) or not
yet (`held`). Nothing is granted past the limit, so the fleet never reserves more than the
limit; a request's actual use exceeds its reservation only when its completion estimate was
low (no `max_tokens`), and then by that request's excess alone.

A replica talks to the ledger in one call, `sync`, every `sync_interval_s` (and at once when a
reservation does not fit its leases): it reports per meter what it has consumed in its epoch
(cumulative: the ledger commits what is new, so a sync sent again after a lost answer is
harmless), what it still holds, and how much more it wants; the answer grants (or, past a
lowered limit or under contention, takes back) lease units. A grant whose answer was lost is
taken back by the next sync, which states what the replica holds. Leases live `ttl_s` past the
replica's last sync. A replica that stops syncing (it died, or lost the ledger for longer) is
*expired*: for a `COUNTER` meter (tokens, spend, requests) its whole outstanding lease is
charged as consumed — an upper bound on what it can have used, so a budget is never
under-charged — and for a `GAUGE` meter (concurrent requests) it is released. The replica's
next sync carries its old epoch, is answered `reset`, and the replica drops its leases and
stops reporting what its old-epoch requests consume (already charged).

Plain data, no I/O, clock passed in; `changes()` hands the persistence layer what a sync
touched (`coordinator/ledger_store.py` writes it to SQLite; `restore` reloads it).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field


class Kind(enum.IntEnum):
    COUNTER = 0  # units are consumed (requests, tokens, nano-USD)
    GAUGE = 1  # units come back when the request ends (concurrent requests)


@dataclass(frozen=True, slots=True)
class MeterReport:
    """One replica's account of one meter, as of the moment it sent the sync.

    `consumed`: settled in the replica's epoch so far, cumulative (COUNTER meters; 0 for
    GAUGE), so a sync sent again after a lost answer never counts twice. `inflight`: reserved
    by running requests. `held`: leased and not reserved. `want`: how many more units it asks
    for. `limit` is the replica's policy for the meter (the latest report wins, so a policy
    reload reaches the ledger with the next sync); `expires_at` is the wall time after which
    the meter's window is over and the ledger may forget it (0: never)."""

    key: str
    kind: Kind
    limit: int
    expires_at: float
    consumed: int = 0
    inflight: int = 0
    held: int = 0
    want: int = 0

    def __post_init__(self) -> None:
        if type(self.kind) is not Kind:  # an int from the wire would compare unequal
            object.__setattr__(self, "kind", Kind(self.kind))


@dataclass(frozen=True, slots=True)
class UsageDelta:
    """What one tenant used of one model since the replica's last sync, for the usage report
    (`GET /v1/meshd/usage`); `day` is the UTC date (YYYY-MM-DD) the requests ended on.
    Spend is in nano-USD (1e-9 USD) so one token at a cent per million is still counted."""

    day: str
    tenant: str
    model: str
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    spend_nusd: int = 0
    refused: int = 0


@dataclass(frozen=True, slots=True)
class SyncRequest:
    replica: str
    epoch: int  # 0: a replica that has none yet
    meters: tuple[MeterReport, ...]
    usage: tuple[UsageDelta, ...] = ()  # for the store, if `usage_seq` is new
    usage_seq: int = 0  # the usage batch's number: a batch sent again is not added again
    ttl_s: float = 0.0  # how long its leases live past this sync (0: the ledger's ttl_s)


@dataclass(frozen=True, slots=True)
class Grant:
    """`delta` lease units (negative: hand back that many of `held`); `free` is what is left
    ungranted fleet-wide after this grant, `used` the meter's committed units."""

    key: str
    delta: int
    free: int
    used: int


@dataclass(frozen=True, slots=True)
class SyncReply:
    epoch: int
    reset: bool  # the replica's leases expired: drop them, old-epoch use is charged already
    grants: tuple[Grant, ...]
    usage_accepted: bool = True  # False: that usage batch was added before (a resend)


@dataclass(slots=True)
class Meter:
    key: str
    kind: Kind
    limit: int
    expires_at: float
    committed: int = 0
    outstanding: int = 0  # sum over replicas
    contended_until: float = 0.0  # someone asked for more than was free, until then


@dataclass(slots=True)
class Lease:
    """What one replica holds of one meter, as the ledger accounts it."""

    outstanding: int = 0
    inflight: int = 0  # as last reported
    reported: int = 0  # the replica's cumulative `consumed` as last committed


@dataclass(slots=True)
class Replica:
    epoch: int
    last_seen: float
    leases: dict[str, Lease] = field(default_factory=dict)
    ttl_s: float = 0.0  # as the replica declared it (0: the ledger's)
    usage_seq: int = 0  # the last usage batch added


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    ttl_s: float = 10.0  # a replica's leases expire this long after its last sync
    grace_s: float = 60.0  # a meter is forgotten this long after its window ended
    contention_s: float = 2.0  # how long a short grant marks the meter contended

    def __post_init__(self) -> None:
        for name in ("ttl_s", "grace_s", "contention_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"gateway.governance.ledger.{name}: must be > 0")


@dataclass(slots=True)
class Changes:
    """What changed since the last `changes()` call, for persistence."""

    meters: set[str] = field(default_factory=set)
    replicas: set[str] = field(default_factory=set)
    dropped_meters: set[str] = field(default_factory=set)
    dropped_replicas: set[str] = field(default_factory=set)


class LedgerState:
    """The ledger's state. Single-threaded: one caller at a time (the Ray actor serialises
    calls), so every `sync` is atomic."""

    def __init__(self, config: LedgerConfig | None = None) -> None:
        self.config = config or LedgerConfig()
        self.meters: dict[str, Meter] = {}
        self.replicas: dict[str, Replica] = {}
        self.next_epoch = 1
        self.expired_total = 0  # replicas expired, for metrics
        self.charged_on_expiry = 0  # COUNTER units charged by expiry
        self._changes = Changes()

    # ---- the one call
    def sync(self, req: SyncRequest, now: float) -> SyncReply:
        self.expire(now)
        rep = self.replicas.get(req.replica)
        reset = rep is None or rep.epoch != req.epoch
        if rep is None or reset:
            if rep is not None:  # a stale epoch whose lease was not expired yet: expire now
                self._expire_replica(req.replica, rep)
            rep = self.replicas[req.replica] = Replica(self.next_epoch, now)
            self.next_epoch += 1
            reset = req.epoch != 0
        rep.last_seen = now
        rep.ttl_s = req.ttl_s
        self._changes.replicas.add(req.replica)
        grants = tuple(self._account(rep, m, now, reset) for m in req.meters)
        fresh = req.usage_seq > rep.usage_seq or req.usage_seq == 0
        if fresh:
            rep.usage_seq = max(rep.usage_seq, req.usage_seq)
        return SyncReply(rep.epoch, reset, grants, fresh)

    def _account(self, rep: Replica, r: MeterReport, now: float, reset: bool) -> Grant:
        m = self.meters.get(r.key)
        if m is None:
            m = self.meters[r.key] = Meter(r.key, r.kind, r.limit, r.expires_at)
        m.limit, m.expires_at = r.limit, r.expires_at
        lease = rep.leases.get(r.key)
        if lease is None:
            lease = rep.leases[r.key] = Lease()
        if reset:  # old-epoch leases were charged (COUNTER) or released (GAUGE) on expiry;
            # a GAUGE meter's running requests are still running: they are held again
            keep = max(r.inflight, 0) if m.kind is Kind.GAUGE else 0
            consumed, held, inflight = 0, 0, keep
            lease.reported = r.consumed  # what it counted so far was charged on expiry
        else:
            consumed = max(r.consumed - lease.reported, 0) if m.kind is Kind.COUNTER else 0
            lease.reported = max(lease.reported, r.consumed)
            held, inflight = max(r.held, 0), max(r.inflight, 0)
        want = max(r.want, 0)
        m.committed += consumed
        m.outstanding += held + inflight - lease.outstanding
        lease.outstanding, lease.inflight = held + inflight, inflight
        free = m.limit - m.committed - m.outstanding
        if free < 0 or (now < m.contended_until and want == 0):
            # past a lowered limit, or others are short: hand back unreserved units
            give_back = min(held, -free) if free < 0 else held // 2
            delta = -give_back
        else:
            delta = min(want, free)
            if delta < want:
                m.contended_until = now + self.config.contention_s
        m.outstanding += delta
        lease.outstanding += delta
        self._changes.meters.add(r.key)
        return Grant(r.key, delta, m.limit - m.committed - m.outstanding, m.committed)

    # ---- expiry
    def expire(self, now: float) -> list[str]:
        """Expire replicas silent for `ttl_s` and forget meters past their window; returns the
        expired replicas."""
        gone = [rid for rid, rep in self.replicas.items()
                if now - rep.last_seen > (rep.ttl_s or self.config.ttl_s)]
        for rid in gone:
            self._expire_replica(rid, self.replicas[rid])
        stale = [k for k, m in self.meters.items()
                 if m.expires_at and now > m.expires_at + self.config.grace_s]
        for key in stale:
            del self.meters[key]
            for rep in self.replicas.values():
                rep.leases.pop(key, None)
            self._changes.dropped_meters.add(key)
            self._changes.meters.discard(key)
        return gone

    def _expire_replica(self, rid: str, rep: Replica) -> None:
        for key, lease in rep.leases.items():
            m = self.meters.get(key)
            if m is None:
                continue
            m.outstanding -= lease.outstanding
            if m.kind is Kind.COUNTER:
                m.committed += lease.outstanding
                self.charged_on_expiry += lease.outstanding
            self._changes.meters.add(key)
        del self.replicas[rid]
        self.expired_total += 1
        self._changes.dropped_replicas.add(rid)
        self._changes.replicas.discard(rid)

    # ---- reads
    def used(self, key: str) -> tuple[int, int, int] | None:
        """(committed, outstanding, limit) of a meter, or None if unknown."""
        m = self.meters.get(key)
        return None if m is None else (m.committed, m.outstanding, m.limit)

    # ---- persistence
    def changes(self) -> Changes:
        out, self._changes = self._changes, Changes()
        return out

    @classmethod
    def restore(cls, config: LedgerConfig, meters: Iterable[Meter],
                replicas: Iterable[tuple[str, Replica]], next_epoch: int) -> LedgerState:
        """A ledger from persisted rows (outstanding is recomputed from the leases)."""
        state = cls(config)
        for m in meters:
            m.outstanding = 0
            state.meters[m.key] = m
        for rid, rep in replicas:
            state.replicas[rid] = rep
            for key, lease in list(rep.leases.items()):
                meter = state.meters.get(key)
                if meter is None:
                    del rep.leases[key]
                    continue
                meter.outstanding += lease.outstanding
        state.next_epoch = max(next_epoch, 1 + max((r.epoch for r in state.replicas.values()),
                                                   default=0))
        return state

    def check_integrity(self) -> None:
        for key, m in self.meters.items():
            total = sum(rep.leases[key].outstanding for rep in self.replicas.values()
                        if key in rep.leases)
            assert total == m.outstanding, (key, total, m.outstanding)
            assert m.outstanding >= 0 and m.committed >= 0, (key, m)
        for rep in self.replicas.values():
            for key, lease in rep.leases.items():
                assert key in self.meters, key
                assert 0 <= lease.inflight <= lease.outstanding, (key, lease)
