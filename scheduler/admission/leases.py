"""A replica's side of the fleet ledger: the leases it holds and the reservations made on them.

The hot path is local arithmetic: `reserve` takes a request's amounts from the leases of every
meter it touches, all or nothing; `settle` returns what the request did not use and books what
it did. Leases come from the ledger (`ledger.py`) through `report` → `LedgerState.sync` →
`apply`, which the gateway runs in the background every `sync_interval_s` and at once when a
reservation does not fit (the only network round trip on a request's path, and only then).

Consumption is reported cumulatively (`consumed` never goes down in an epoch; the ledger
commits what is new), so a sync whose answer was lost can simply be followed by the next.

`valid(now)` says whether the leases may be used: they live `ttl_s` from the send time of the
last sync the ledger answered, less a margin, so a replica stops using them before the ledger
can have expired them. An answer with `reset` (the ledger expired this replica: it was out of
touch too long) drops every lease; requests reserved under the old epoch settle without being
reported, since the ledger charged their reservations in full when it expired them.

Plain data, no I/O; times are the caller's clock (monotonic), windows are wall time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshd.scheduler.admission.ledger import Kind, MeterReport, SyncReply, SyncRequest


@dataclass(slots=True, eq=False)
class LocalMeter:
    """One meter as this replica holds it. `held` may go below 0 when a request used more than
    it reserved (its completion estimate was low); the debt is paid from the next grants."""

    key: str
    kind: Kind
    limit: int
    expires_at: float  # wall time the meter's window ends (0: never)
    held: int = 0  # leased, not reserved
    inflight: int = 0  # reserved by running requests
    consumed: int = 0  # settled in this epoch, cumulative
    sent: int = 0  # `consumed` as of the sync in flight
    acked: int = 0  # `consumed` as the ledger last acknowledged it
    need: int = 0  # a reservation that did not fit asked for this much
    free: int = -1  # fleet-wide ungranted units at the last sync (-1: unknown)
    used: int = 0  # fleet-wide committed units at the last sync

    def remaining(self) -> int:
        """The best local estimate of what is left fleet-wide (for x-ratelimit headers)."""
        return max(0, self.held + (self.free if self.free > 0 else 0))


@dataclass(slots=True)
class Ticket:
    """One request's reservation: (meter, units) pairs and the epoch it was made under."""

    parts: list[tuple[LocalMeter, int]]
    epoch: int
    settled: bool = False


@dataclass(frozen=True, slots=True)
class LeaseConfig:
    fraction: float = 0.1  # a lease tops up to this share of a meter's limit
    ttl_s: float = 10.0  # must equal the ledger's
    margin_s: float = 2.0  # stop using leases this long before the ledger may expire them

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError("gateway.governance.ledger.lease_fraction: must be in (0, 1]")
        if not 0 <= self.margin_s < self.ttl_s:
            raise ValueError("gateway.governance.ledger.margin_s: must be in [0, ttl_s)")


@dataclass(slots=True)
class LeaseBook:
    replica: str
    config: LeaseConfig = field(default_factory=LeaseConfig)
    epoch: int = 0
    valid_until: float = 0.0
    meters: dict[str, LocalMeter] = field(default_factory=dict)
    resets: int = 0

    def meter(self, key: str, kind: Kind, limit: int, expires_at: float) -> LocalMeter:
        m = self.meters.get(key)
        if m is None:
            m = self.meters[key] = LocalMeter(key, kind, limit, expires_at)
        else:
            m.limit = limit
        return m

    def valid(self, now: float) -> bool:
        return now < self.valid_until

    # ---- the hot path
    def reserve(self, parts: list[tuple[LocalMeter, int]]) -> LocalMeter | None:
        """Take every part's units from its lease, or none of them: returns None on success,
        else the first meter short (its `need` is set for the next sync)."""
        for i, (m, units) in enumerate(parts):
            if m.held < units:
                for m2, u2 in parts[:i]:
                    m2.held += u2
                    m2.inflight -= u2
                m.need = max(m.need, units)
                return m
            m.held -= units
            m.inflight += units
        return None

    def force(self, parts: list[tuple[LocalMeter, int]]) -> None:
        """Reserve without a lease (fail-open while the ledger is unreachable)."""
        for m, units in parts:
            m.held -= units
            m.inflight += units

    def ticket(self, parts: list[tuple[LocalMeter, int]]) -> Ticket:
        return Ticket(parts, self.epoch)

    def settle(self, ticket: Ticket, actual: list[int]) -> None:
        """End a reservation: `actual[i]` units of part i were used (COUNTER meters; a GAUGE
        part's units all come back). Idempotent."""
        if ticket.settled:
            return
        ticket.settled = True
        stale = ticket.epoch != self.epoch
        gauge = Kind.GAUGE
        for (m, units), used in zip(ticket.parts, actual):  # noqa: B905 (equal by contract)
            if m.kind is gauge:  # kept across a reset (the ledger holds them again)
                m.inflight -= units
                m.held += units
            elif not stale:
                m.inflight -= units
                m.held += units - used
                m.consumed += used

    # ---- the sync
    def report(self) -> SyncRequest:
        """What to tell the ledger now; apply its answer with `apply`. Windows the ledger will
        forget soon are left out once nothing is reserved on them."""
        out = []
        for m in self.meters.values():
            m.sent = m.consumed
            target = max(m.need, -(-m.limit * self.config.fraction // 1))
            want = max(0, int(target) - m.held) if m.held < target else 0
            out.append(MeterReport(m.key, m.kind, m.limit, m.expires_at, m.sent, m.inflight,
                                   m.held, want))
        return SyncRequest(self.replica, self.epoch, tuple(out), ttl_s=self.config.ttl_s)

    def apply(self, reply: SyncReply, sent_at: float) -> None:
        """The ledger's answer to the `report` sent at `sent_at` (caller's clock)."""
        if reply.reset:
            self.resets += 1
            for lm in self.meters.values():
                lm.held = 0
                if lm.kind is Kind.COUNTER:
                    lm.inflight = 0
        self.epoch = reply.epoch
        self.valid_until = sent_at + self.config.ttl_s - self.config.margin_s
        for g in reply.grants:
            got = self.meters.get(g.key)
            if got is None:
                continue
            m = got
            m.acked = m.sent  # after a reset too: the ledger took it as the baseline
            m.held += g.delta
            m.need = 0
            m.free, m.used = g.free, g.used

    def forget(self, wall_now: float) -> int:
        """Drop meters whose window ended with nothing reserved or unreported on them."""
        gone = [k for k, m in self.meters.items()
                if m.expires_at and wall_now > m.expires_at and m.inflight <= 0
                and m.consumed == m.acked]
        for k in gone:
            del self.meters[k]
        return len(gone)

    def inflight(self) -> int:
        """Units reserved by running requests, over every meter (a metric)."""
        return sum(m.inflight for m in self.meters.values())

    def check_integrity(self) -> None:
        for m in self.meters.values():
            assert m.inflight >= 0, (m.key, m.inflight)
            assert 0 <= m.acked <= m.consumed, (m.key, m.acked, m.consumed)
