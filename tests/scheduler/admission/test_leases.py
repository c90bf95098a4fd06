"""The fleet ledger and the replicas' lease books together: grants never exceed a limit,
settlement returns what a request did not use, expiry charges or releases, reset drops."""

from __future__ import annotations

import random

from meshd.scheduler.admission.leases import LeaseBook, LeaseConfig, LocalMeter
from meshd.scheduler.admission.ledger import Kind, LedgerConfig, LedgerState, SyncRequest

TTL = 10.0


def make_book(name: str, fraction: float = 0.1) -> LeaseBook:
    return LeaseBook(name, LeaseConfig(fraction=fraction, ttl_s=TTL, margin_s=2.0))


def sync(ledger: LedgerState, book: LeaseBook, now: float) -> None:
    book.apply(ledger.sync(book.report(), now), now)


def make_meter(book: LeaseBook, limit: int = 100, kind: Kind = Kind.COUNTER) -> LocalMeter:
    return book.meter("tpm/acme/1", kind, limit, 0.0)


def test_first_reservation_needs_a_sync_then_fits() -> None:
    ledger, book = LedgerState(LedgerConfig(ttl_s=TTL)), make_book("a")
    m = make_meter(book)
    assert book.reserve([m], [30]) is m and m.need == 30
    sync(ledger, book, 0.0)
    assert m.held == 30  # the need, more than the 10% fraction
    assert book.reserve([m], [30]) is None
    assert (m.held, m.inflight) == (0, 30)
    ticket = book.ticket([m], [30])
    book.settle(ticket, [12])
    assert (m.held, m.inflight, m.consumed) == (18, 0, 12)
    sync(ledger, book, 1.0)
    assert ledger.used("tpm/acme/1") == (12, 18, 100)
    assert (m.consumed, m.acked) == (12, 12)  # cumulative in the epoch
    ledger.check_integrity()
    book.check_integrity()


def test_all_or_nothing() -> None:
    ledger, book = LedgerState(), make_book("a")
    a, b = make_meter(book), book.meter("rpm/acme/1", Kind.COUNTER, 2, 0.0)
    a.need, b.need = 50, 1
    sync(ledger, book, 0.0)
    assert (a.held, b.held) == (50, 1)
    assert book.reserve([a, b], [10, 2]) is b
    assert (a.held, a.inflight, b.held) == (50, 0, 1)  # a was rolled back


def test_grants_across_replicas_never_exceed_the_limit() -> None:
    rng = random.Random(7)
    ledger = LedgerState(LedgerConfig(ttl_s=TTL))
    books = [make_book(f"r{i}") for i in range(4)]
    meters = [make_meter(b, limit=1000) for b in books]
    tickets: list[tuple[LeaseBook, object, int]] = []
    used = 0
    for step in range(2000):
        i = rng.randrange(4)
        book, m = books[i], meters[i]
        op = rng.random()
        if op < 0.5:
            units = rng.randint(1, 40)
            if book.reserve([m], [units]) is None:
                tickets.append((book, book.ticket([m], [units]), units))
        elif op < 0.8 and tickets:
            book2, t, units = tickets.pop(rng.randrange(len(tickets)))
            actual = rng.randint(0, units)
            used += actual
            book2.settle(t, [actual])  # type: ignore[arg-type]
        else:
            sync(ledger, book, step * 0.001)
        committed, outstanding, limit = ledger.used(m.key) or (0, 0, 0)
        assert committed + outstanding <= limit
        ledger.check_integrity()
    for book in books:
        sync(ledger, book, 3.0)
    committed, _, _ = ledger.used("tpm/acme/1") or (0, 0, 0)
    pending = sum(units for _, _, units in tickets)
    assert committed == used and used + pending <= 1000


def test_contention_takes_back_idle_leases() -> None:
    ledger = LedgerState(LedgerConfig(ttl_s=TTL, contention_s=5.0))
    a, b = make_book("a", fraction=0.5), make_book("b", fraction=0.5)
    ma, mb = make_meter(a), make_meter(b)
    sync(ledger, a, 0.0)
    sync(ledger, b, 0.0)
    assert (ma.held, mb.held) == (50, 50)
    mb.need = 80  # b wants more than is free: the meter is contended
    sync(ledger, b, 0.1)
    assert mb.held == 50
    sync(ledger, a, 0.2)  # a wants nothing more: it hands back half of what it holds
    assert ma.held == 25
    mb.need = 80
    sync(ledger, b, 0.3)
    assert mb.held == 75
    ledger.check_integrity()


def test_lowered_limit_takes_back_leases() -> None:
    ledger, book = LedgerState(), make_book("a", fraction=0.5)
    m = make_meter(book, limit=100)
    sync(ledger, book, 0.0)
    assert m.held == 50
    m.limit = 20
    sync(ledger, book, 0.1)
    assert m.held == 20 and ledger.used(m.key) == (0, 20, 20)


def test_expired_replica_is_charged_its_lease_and_reset() -> None:
    ledger = LedgerState(LedgerConfig(ttl_s=TTL))
    dead, live = make_book("dead"), make_book("live")
    m = make_meter(dead)
    conc = dead.meter("max_concurrent/acme", Kind.GAUGE, 4, 0.0)
    m.need, conc.need = 40, 1
    sync(ledger, dead, 0.0)
    assert dead.reserve([m, conc], [30, 1]) is None
    running = dead.ticket([m, conc], [30, 1])
    ledger.sync(live.report(), TTL + 1)  # any sync expires the silent replica
    assert ledger.used(m.key) == (40, 0, 100)  # its whole lease, charged
    assert ledger.used(conc.key) == (0, 0, 4)  # the gauge released
    assert ledger.expired_total == 1 and ledger.charged_on_expiry == 40
    assert not dead.valid(TTL + 1)
    sync(ledger, dead, TTL + 2)  # it comes back: reset
    assert dead.resets == 1 and m.held == 0 and m.inflight == 0
    # the running request is held again (and a fresh unit of lease granted beside it)
    assert (conc.inflight, conc.held) == (1, 1) and ledger.used(conc.key) == (0, 2, 4)
    dead.settle(running, [30, 1])  # the old-epoch request ends: not reported again
    assert m.consumed == 0 and conc.inflight == 0 and conc.held == 2
    sync(ledger, dead, TTL + 3)
    assert ledger.used(m.key)[0] == 40
    ledger.check_integrity()


def test_failed_sync_keeps_consumption_for_the_next() -> None:
    ledger, book = LedgerState(), make_book("a")
    m = make_meter(book)
    m.need = 20
    sync(ledger, book, 0.0)
    assert book.reserve([m], [20]) is None
    book.settle(book.ticket([m], [20]), [15])
    book.report()  # sent, but the answer never came
    assert (m.consumed, m.acked) == (15, 0)
    sync(ledger, book, 1.0)
    assert ledger.used(m.key)[0] == 15 and m.acked == 15


def test_a_sync_applied_twice_counts_once() -> None:
    ledger, book = LedgerState(), make_book("a")
    m = make_meter(book)
    m.need = 20
    sync(ledger, book, 0.0)
    assert book.reserve([m], [20]) is None
    book.settle(book.ticket([m], [20]), [15])
    req = book.report()
    ledger.sync(req, 1.0)  # applied, but the answer was lost
    book.apply(ledger.sync(req, 1.5), 1.5)  # sent again
    sync(ledger, book, 2.0)
    assert ledger.used(m.key) == (15, m.held, 100)
    ledger.check_integrity()


def test_usage_batch_sent_again_is_refused_once_added() -> None:
    ledger = LedgerState()
    req = SyncRequest("a", 0, (), usage_seq=1)
    assert ledger.sync(req, 0.0).usage_accepted
    epoch = ledger.replicas["a"].epoch
    again = SyncRequest("a", epoch, (), usage_seq=1)
    assert not ledger.sync(again, 0.1).usage_accepted
    assert ledger.sync(SyncRequest("a", epoch, (), usage_seq=2), 0.2).usage_accepted


def test_windows_are_forgotten_once_settled() -> None:
    book = make_book("a")
    m = book.meter("rpm/acme/7", Kind.COUNTER, 10, 420.0)
    m.inflight = 1
    assert book.forget(421.0) == 0
    m.inflight = 0
    assert book.forget(419.0) == 0 and book.forget(421.0) == 1
    ledger = LedgerState(LedgerConfig(grace_s=60))
    ledger.sync(book.report(), 0.0)
    other = make_book("b")
    other.meter("rpm/acme/7", Kind.COUNTER, 10, 420.0)
    ledger.sync(other.report(), 0.0)
    ledger.expire(481.0)
    assert ledger.used("rpm/acme/7") is None
    ledger.check_integrity()
