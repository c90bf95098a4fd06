"""Pools: a tenant's meters reserved together, slot by slot. What the ledger sees after a
flush (every sync) is exactly what meter-by-meter reservation would have told it, and a pool
refuses exactly when some meter cannot cover the request."""

from __future__ import annotations

import random

from meshd.scheduler.admission.leases import (
    LeaseBook,
    LeaseConfig,
    LocalMeter,
    Pool,
    PoolTicket,
    Ticket,
)
from meshd.scheduler.admission.ledger import Kind, LedgerConfig, LedgerState

TTL = 10.0
REQUEST, PROMPT, COMPLETION, COST, TOKENS = range(5)
# (key, kind, limit, what it counts): two meters share a slot (TOKENS), REQUEST has a COUNTER
# and a GAUGE slot
SPECS = (("rpm/t/1", Kind.COUNTER, 1500, REQUEST),
         ("tpm/t/1", Kind.COUNTER, 150_000, TOKENS),
         ("daily_tokens/t/d", Kind.COUNTER, 120_000, TOKENS),
         ("input_tpm/t/1", Kind.COUNTER, 60_000, PROMPT),
         ("max_concurrent/t", Kind.GAUGE, 8, REQUEST))


def book_with_meters(name: str) -> tuple[LeaseBook, list[LocalMeter]]:
    book = LeaseBook(name, LeaseConfig(fraction=0.2, ttl_s=TTL, margin_s=2.0))
    return book, [book.meter(k, kind, limit, 0.0) for k, kind, limit, _ in SPECS]


def synced_pool() -> tuple[LedgerState, LeaseBook, list[LocalMeter], Pool]:
    """A pool over SPECS' meters on a book that has synced once (its leases granted)."""
    ledger = LedgerState(LedgerConfig(ttl_s=TTL))
    book, meters = book_with_meters("r")
    pool = book.pool(meters, [sel for *_, sel in SPECS])
    book.apply(ledger.sync(book.report(), 0.0), 0.0)
    return ledger, book, meters, pool


def use(prompt: int, completion: int) -> tuple[int, int, int, int, int]:
    return (1, prompt, completion, 0, prompt + completion)


def state(meters: list[LocalMeter]) -> list[tuple[int, int, int, int]]:
    return [(m.held, m.inflight, m.consumed, m.acked) for m in meters]


def test_a_pool_tells_the_ledger_what_meter_by_meter_reservation_would() -> None:
    rng = random.Random(11)
    ledgers = [LedgerState(LedgerConfig(ttl_s=TTL)) for _ in range(2)]
    (ref, ref_meters), (book, meters) = book_with_meters("r"), book_with_meters("r")
    sels = [sel for *_, sel in SPECS]
    pool = book.pool(meters, sels)
    running: list[tuple[tuple[int, ...], Ticket, PoolTicket]] = []
    decisions = refusals = 0
    for step in range(3000):
        op, now = rng.random(), step * 0.002
        if op < 0.45:
            u = use(rng.randint(1, 60), rng.randint(0, 80))
            want = [u[s] for s in sels]
            got_ref = ref.reserve(ref_meters, want)
            got = pool.reserve(u)
            assert (got_ref is None) == (got is None), step  # the same decision
            if got is not None:  # the meter it names could not cover its share
                refusals += 1
                slot = pool.slot_of(got)
                assert got.held + pool.credit[slot] < u[sels[meters.index(got)]]
            else:
                running.append((u, ref.ticket(ref_meters, want), pool.ticket(u)))
            decisions += 1
        elif op < 0.9 and running:
            r, t_ref, t = running.pop(rng.randrange(len(running)))
            actual = use(r[PROMPT], rng.randint(0, r[COMPLETION] + 20))  # may exceed the estimate
            ref.settle(t_ref, [actual[s] for s in sels])
            pool.settle(t, actual)
        else:
            for b, led in ((ref, ledgers[0]), (book, ledgers[1])):
                b.apply(led.sync(b.report(), now), now)
            assert state(meters) == state(ref_meters), step  # flushed: identical
            for m in meters:
                assert ledgers[1].used(m.key) == ledgers[0].used(m.key)
            ledgers[1].check_integrity()
            book.check_integrity()
    assert decisions > 1000 and 50 < refusals < decisions / 2


def test_pools_sharing_a_meter_find_each_others_credit_after_a_flush() -> None:
    ledger = LedgerState(LedgerConfig(ttl_s=TTL))
    book = LeaseBook("r", LeaseConfig(fraction=1.0, ttl_s=TTL, margin_s=2.0))
    fleet = book.meter("fleet_tokens_per_s/fleet/1", Kind.COUNTER, 100, 0.0)
    a = book.pool([book.meter("tpm/a/1", Kind.COUNTER, 1000, 0.0), fleet], [TOKENS, TOKENS])
    b = book.pool([book.meter("tpm/b/1", Kind.COUNTER, 1000, 0.0), fleet], [TOKENS, TOKENS])
    book.apply(ledger.sync(book.report(), 0.0), 0.0)
    assert fleet.held == 100
    assert a.reserve(use(10, 0)) is None  # a carves half of the fleet's lease into its credit
    assert b.reserve(use(60, 0)) is fleet  # b cannot: a's credit is not b's
    book.flush()  # what every sync does first
    assert b.reserve(use(60, 0)) is None  # the fleet still had 90 to give
    assert a.reserve(use(40, 0)) is fleet and fleet.held < 40


def test_a_refusal_is_all_or_nothing_and_asks_for_the_whole_request() -> None:
    ledger, book, meters, pool = synced_pool()
    before = state(meters)
    prompt = meters[3].held + 1  # input_tpm cannot cover it; the slots before it could
    assert pool.reserve(use(prompt, 0)) is meters[3]
    book.flush()
    assert state(meters) == before  # nothing stayed reserved
    assert meters[3].need == prompt
    book.apply(ledger.sync(book.report(), 0.1), 0.1)
    assert pool.reserve(use(prompt, 0)) is None  # the sync brought the lease it asked for


def test_a_reset_drops_counter_credit_and_keeps_running_requests_concurrency() -> None:
    ledger, book, meters, pool = synced_pool()
    running = pool.ticket(use(5, 5))
    assert pool.reserve(use(5, 5)) is None
    ledger.sync(LeaseBook("other").report(), TTL + 1)  # the ledger expires the silent replica
    book.apply(ledger.sync(book.report(), TTL + 2), TTL + 2)  # it comes back: reset
    assert book.resets == 1
    conc = meters[4]
    assert conc.inflight == 1  # the running request holds its concurrency still
    assert all(m.inflight == 0 for m in meters[:4])
    pool.settle(running, use(5, 5))  # from the old epoch: books no consumption
    book.flush()
    assert all(m.consumed == 0 for m in meters[:4]) and conc.inflight == 0
    book.check_integrity()


def test_a_retired_pool_is_dropped_once_its_requests_settle() -> None:
    ledger, book, meters, pool = synced_pool()
    t = pool.ticket(use(3, 4))
    assert pool.reserve(use(3, 4)) is None
    pool.retired = True  # its window turned over
    book.flush()
    assert book.pools == [pool]  # a request still runs on it
    pool.settle(t, use(3, 2))
    book.apply(ledger.sync(book.report(), 0.1), 0.1)
    assert book.pools == [] and meters[1].consumed == 5 and book.inflight() == 0
