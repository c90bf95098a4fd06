"""A replica's side of the fleet ledger: the leases it holds and the reservations made on them.

The hot path is local arithmetic: `reserve` takes a request's amounts from the leases of every
meter it touches, all or nothing; `settle` returns what the request did not use and books what
it did. The gateway reserves through a `Pool` (below): the same accounting, slot by slot
instead of meter by meter, flushed into the meters before every report; the meter-by-meter
methods are the reference it is tested against.

Leases come from the ledger (`ledger.py`) through `report` → `LedgerState.sync` → `apply`,
which the gateway runs in the background every `sync_interval_s` and at once when a
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

from collections.abc import Sequence
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


@dataclass(slots=True)
class Ticket:
    """One request's reservation: `units[i]` of `meters[i]`, made under `epoch`."""

    meters: Sequence[LocalMeter]
    units: Sequence[int]
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
    pools: list[Pool] = field(default_factory=list)  # every pool with credit on a meter

    def meter(self, key: str, kind: Kind, limit: int, expires_at: float) -> LocalMeter:
        m = self.meters.get(key)
        if m is None:
            m = self.meters[key] = LocalMeter(key, kind, limit, expires_at)
        else:
            m.limit = limit
        return m

    def valid(self, now: float) -> bool:
        return now < self.valid_until

    # ---- the hot path: `meters` and `units` are parallel (units[i] of meters[i])
    def reserve(self, meters: Sequence[LocalMeter], units: Sequence[int]) -> LocalMeter | None:
        """Take every meter's units from its lease, or none of them: returns None on success,
        else the first meter short (its `need` is set for the next sync)."""
        for i, (m, u) in enumerate(zip(meters, units)):  # noqa: B905 (equal by contract)
            if m.held < u:
                for m2, u2 in zip(meters[:i], units):  # noqa: B905
                    m2.held += u2
                    m2.inflight -= u2
                m.need = max(m.need, u)
                return m
            m.held -= u
            m.inflight += u
        return None

    def force(self, meters: Sequence[LocalMeter], units: Sequence[int]) -> None:
        """Reserve without a lease (fail-open while the ledger is unreachable)."""
        for m, u in zip(meters, units):  # noqa: B905 (equal by contract)
            m.held -= u
            m.inflight += u

    def ticket(self, meters: Sequence[LocalMeter], units: Sequence[int]) -> Ticket:
        return Ticket(meters, units, self.epoch)

    def settle(self, ticket: Ticket, used: Sequence[int]) -> None:
        """End a reservation: `used[i]` units of meter i were used (COUNTER meters; a GAUGE
        meter's units all come back). Idempotent."""
        if ticket.settled:
            return
        ticket.settled = True
        stale = ticket.epoch != self.epoch
        gauge = Kind.GAUGE
        for m, u, used_u in zip(ticket.meters, ticket.units, used):  # noqa: B905
            if m.kind is gauge:  # kept across a reset (the ledger holds them again)
                m.inflight -= u
                m.held += u
            elif not stale:
                m.inflight -= u
                m.held += u - used_u
                m.consumed += used_u

    # ---- the sync
    def pool(self, meters: Sequence[LocalMeter], sels: Sequence[int]) -> Pool:
        """A pool over `meters` (meter i counts `use[sels[i]]` of a request), registered so
        every sync flushes it."""
        pool = Pool(self, meters, sels)
        self.pools.append(pool)
        return pool

    def flush(self) -> None:
        """Hand every pool's credit and consumption back to its meters (before a report, so
        the ledger sees exactly what running requests hold); retired pools with nothing
        reserved left are dropped."""
        keep = []
        for pool in self.pools:
            pool.flush()
            if not pool.retired or any(pool.carved):
                keep.append(pool)
        self.pools = keep

    def report(self) -> SyncRequest:
        """What to tell the ledger now; apply its answer with `apply`. Windows the ledger will
        forget soon are left out once nothing is reserved on them."""
        self.flush()
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
            for pool in self.pools:
                pool.reset()
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
        self.flush()
        gone = [k for k, m in self.meters.items()
                if m.expires_at and wall_now > m.expires_at and m.inflight <= 0
                and m.consumed == m.acked]
        for k in gone:
            del self.meters[k]
        return len(gone)

    def inflight(self) -> int:
        """Units reserved by running requests, over every meter (a metric)."""
        return (sum(m.inflight for m in self.meters.values())
                - sum(pool.unreserved() for pool in self.pools))

    def check_integrity(self) -> None:
        for m in self.meters.values():
            assert m.inflight >= 0, (m.key, m.inflight)
            assert 0 <= m.acked <= m.consumed, (m.key, m.acked, m.consumed)


@dataclass(slots=True)
class PoolTicket:
    """One request's reservation from a pool: `use` (indexed like the pool's sels), under
    `epoch`."""

    use: Sequence[int]
    epoch: int
    settled: bool = False


class Pool:
    """Meters always reserved together (one tenant's limits and the fleet's in the current
    windows), so a request's work is per slot, not per meter. A slot is the meters that count
    the same amount of the same kind (`tpm`, `daily_tokens`, `monthly_tokens` and the fleet's
    tokens all count prompt + completion tokens). The pool carves credit out of every meter
    of a slot at once (their `held` moves to `inflight`) and requests reserve and settle on
    the slot's credit; `flush` (run by every sync, through `LeaseBook.report`) hands the
    unreserved credit back and books what settled as each meter's consumption, so what the
    ledger is told, and every guarantee built on it, is as if each meter were reserved one by
    one. A reservation the credit does not cover carves more; when a meter cannot give it,
    that meter is the one short (its `need` asks the next sync for more)."""

    __slots__ = ("_book", "_counting", "_gauges", "_slot_sels", "carved", "credit", "gauge",
                 "retired", "sels", "slots", "spent")

    def __init__(self, book: LeaseBook, meters: Sequence[LocalMeter], sels: Sequence[int]
                 ) -> None:
        self._book = book
        order: dict[tuple[int, Kind], list[LocalMeter]] = {}
        for m, sel in zip(meters, sels):  # noqa: B905 (equal by contract)
            order.setdefault((sel, m.kind), []).append(m)
        self.slots = tuple(tuple(ms) for ms in order.values())
        self.sels = tuple(sel for sel, _ in order)
        self.gauge = tuple(kind is Kind.GAUGE for _, kind in order)
        # (slot, sel) pairs for the hot path: every slot, the COUNTER ones, the GAUGE ones
        self._slot_sels = tuple(enumerate(self.sels))
        self._counting = tuple((j, sel) for j, sel in self._slot_sels if not self.gauge[j])
        self._gauges = tuple((j, sel) for j, sel in self._slot_sels if self.gauge[j])
        n = len(self.slots)
        self.credit = [0] * n  # carved from every meter of the slot, not reserved
        self.spent = [0] * n  # settled as used since the last flush (COUNTER slots)
        self.carved = [0] * n  # taken from each meter's held: credit + reserved + spent
        self.retired = False  # no new reservations: dropped once nothing is carved

    def reserve(self, use: Sequence[int]) -> LocalMeter | None:
        """Reserve `use[sel]` on every slot, or nothing: None on success, else the first meter
        short."""
        credit = self.credit
        for j, sel in self._slot_sels:
            u = use[sel]
            if credit[j] < u:
                short = self._carve(j, u - credit[j], u)
                if short is not None:
                    for k, sel_k in self._slot_sels[:j]:
                        credit[k] += use[sel_k]
                    return short
            credit[j] -= u
        return None

    def force(self, use: Sequence[int]) -> None:
        """Reserve without a lease (fail-open while the ledger is unreachable): meters' held
        may go below 0."""
        for j, sel in enumerate(self.sels):
            short = use[sel] - self.credit[j]
            if short > 0:
                self._take(j, short)
            self.credit[j] -= use[sel]

    def ticket(self, use: Sequence[int]) -> PoolTicket:
        return PoolTicket(use, self._book.epoch)

    def settle(self, ticket: PoolTicket, used: Sequence[int]) -> None:
        """End a reservation: `used[sel]` was used (a GAUGE slot's units all come back; a
        ticket from before a ledger reset books nothing on COUNTER slots: the ledger charged
        its lease when it expired this replica). Idempotent."""
        if ticket.settled:
            return
        ticket.settled = True
        credit, use = self.credit, ticket.use
        for j, sel in self._gauges:
            credit[j] += use[sel]
        if ticket.epoch == self._book.epoch:  # else stale: the COUNTER slots book nothing
            spent = self.spent
            for j, sel in self._counting:
                u = used[sel]
                credit[j] += use[sel] - u
                spent[j] += u

    def flush(self) -> None:
        """Hand the unreserved credit back to the meters and book what was spent."""
        for j, ms in enumerate(self.slots):
            c, s = self.credit[j], self.spent[j]
            if c or s:
                for m in ms:
                    m.held += c
                    m.inflight -= c + s
                    m.consumed += s
                self.carved[j] -= c + s
                self.credit[j] = self.spent[j] = 0

    def reset(self) -> None:
        """The ledger reset this replica: its COUNTER meters' leases are gone, carve and all."""
        for j, gauge in enumerate(self.gauge):
            if not gauge:
                self.credit[j] = self.spent[j] = self.carved[j] = 0

    def unreserved(self) -> int:
        """What the meters count as inflight that no running request holds: the credit and
        the consumption not flushed yet, over every meter (for `LeaseBook.inflight`)."""
        return sum((c + s) * len(ms)
                   for c, s, ms in zip(self.credit, self.spent, self.slots))  # noqa: B905

    def slot_of(self, m: LocalMeter) -> int:
        return next(j for j, ms in enumerate(self.slots) if m in ms)

    def _carve(self, j: int, short: int, u: int) -> LocalMeter | None:
        """Move at least `short` more units into slot j's credit (half of what the slot's
        tightest meter holds, so the next requests find credit), or return that meter when it
        cannot give them; every meter that cannot asks the next sync for the whole `u`."""
        ms = self.slots[j]
        tight = min(ms, key=_held)
        if tight.held < short:
            for m in ms:
                if m.held < short:
                    m.need = max(m.need, u)
            return tight
        self._take(j, max(short, tight.held // 2))
        return None

    def _take(self, j: int, units: int) -> None:
        for m in self.slots[j]:
            m.held -= units
            m.inflight += units
        self.credit[j] += units
        self.carved[j] += units


def _held(m: LocalMeter) -> int:
    return m.held
