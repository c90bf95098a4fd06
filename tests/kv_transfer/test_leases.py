"""The prefill side's block leases (shared by the embedded engine and the vLLM connector)."""

from __future__ import annotations

import threading
import time

import pytest

from meshd.kv_transfer.leases import RENEW_MARGIN_S, LeaseTable


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_table(timeout_s: float = 10.0, transfer_timeout_s: float = 30.0,
               **kw: object) -> tuple[LeaseTable, FakeClock]:
    clock = FakeClock()
    return LeaseTable(timeout_s, transfer_timeout_s=transfer_timeout_s, clock=clock,
                      **kw), clock  # type: ignore[arg-type]


def test_lease_ends_when_sent() -> None:
    leases, _ = make_table()
    leases.grant("r1", [3, 4])
    assert leases.take_done() == set()
    assert leases.get("r1") == (3, 4) and leases.lookup("r1") == [3, 4]
    leases.on_sent("r1")
    assert leases.lookup("r1") is None  # served once only
    assert leases.take_done() == {"r1"}
    assert leases.take_done() == set()
    s = leases.stats()
    assert (s.granted, s.sent, s.expired, s.released, s.lookups_missed) == (1, 1, 0, 0, 1)


def test_renew_rule() -> None:
    """A lookup renews to max(deadline, now + transfer_timeout_s + RENEW_MARGIN_S)."""
    assert RENEW_MARGIN_S == 1.0
    leases, clock = make_table(timeout_s=10.0, transfer_timeout_s=30.0)
    leases.grant("idle", [1])  # until 1010
    leases.grant("busy", [2])  # until 1010, renewed below to 1005 + 31 = 1036
    leases.grant("long", [3], expires_at=1100.0)  # a renewal never shortens it
    clock.now = 1005.0
    assert leases.lookup("busy") == [2] and leases.lookup("long") == [3]
    clock.now = 1010.0
    assert leases.expire() == ["idle"]
    clock.now = 1035.9
    assert leases.expire() == []
    clock.now = 1036.0
    assert leases.expire() == ["busy"]
    clock.now = 1099.9
    assert leases.expire() == [] and leases.held() == {"long": (3,)}
    clock.now = 1100.0
    assert leases.take_done() == {"idle", "busy", "long"}
    assert len(leases) == 0 and leases.stats().expired == 3
    leases.on_sent("busy")  # a late ack after expiry changes nothing
    assert leases.take_done() == set() and leases.stats().sent == 0


def test_lookup_waits_for_a_grant_on_its_way() -> None:
    leases = LeaseTable(30.0, transfer_timeout_s=30.0, lookup_wait_s=2.0)
    timer = threading.Timer(0.2, leases.grant, args=("late", [9]))
    timer.start()
    t0 = time.monotonic()
    assert leases.lookup("late") == [9]
    assert 0.1 < time.monotonic() - t0 < 1.5
    t0 = time.monotonic()
    assert LeaseTable(30.0, transfer_timeout_s=30.0, lookup_wait_s=0.2).lookup("never") is None
    assert time.monotonic() - t0 < 1.0


def test_lookup_does_not_wait_for_an_ended_lease() -> None:
    leases = LeaseTable(30.0, transfer_timeout_s=30.0, lookup_wait_s=5.0)
    leases.grant("r", [1])
    leases.on_sent("r")
    leases.take_done()  # the id is still known as ended after it was handed out
    t0 = time.monotonic()
    assert leases.lookup("r") is None
    assert time.monotonic() - t0 < 0.5
    leases.grant("r", [2])  # the same id granted again is a new lease
    assert leases.lookup("r") == [2]


def test_release() -> None:
    leases, _ = make_table()
    leases.grant("r", [1])
    leases.release("r")
    assert leases.take_done() == {"r"}
    assert leases.lookup("r") is None and leases.stats().released == 1


def test_on_end_once_per_lease_with_reason_outside_the_lock() -> None:
    ends: list[tuple[str, str]] = []

    def on_end(rid: str, why: str) -> None:
        # The table's lock is free: another thread can use the table meanwhile.
        t = threading.Thread(target=leases.held)
        t.start()
        t.join(2.0)
        assert not t.is_alive()
        ends.append((rid, why))

    leases, clock = make_table(on_end=on_end)
    for rid in ("s", "e", "r"):
        leases.grant(rid, [1])
    leases.on_sent("s")
    leases.release("r")
    clock.now += 10
    assert leases.expire() == ["e"]
    # Second ends of the same leases are no-ops.
    leases.on_sent("s")
    leases.on_sent("e")
    leases.release("s")
    assert leases.expire() == []
    assert ends == [("s", "sent"), ("r", "released"), ("e", "expired")]
    assert leases.take_done() == set()  # ends were pushed, not queued


def test_concurrent_sent_and_expiry_end_each_lease_once() -> None:
    ends: list[tuple[str, str]] = []
    lock = threading.Lock()

    def on_end(rid: str, why: str) -> None:
        with lock:
            ends.append((rid, why))

    leases, clock = make_table(on_end=on_end)
    ids = [f"r{i}" for i in range(500)]
    for rid in ids:
        leases.grant(rid, [1])
    clock.now += 10
    senders = [threading.Thread(target=lambda part=ids[k::4]: [leases.on_sent(r) for r in part])
               for k in range(4)]
    for t in senders:
        t.start()
    leases.expire()
    for t in senders:
        t.join()
    assert sorted(r for r, _ in ends) == sorted(ids)
    s = leases.stats()
    assert s.sent + s.expired == len(ids) and len(leases) == 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        LeaseTable(0.0, transfer_timeout_s=30.0)
    with pytest.raises(ValueError):
        LeaseTable(10.0, transfer_timeout_s=30.0, lookup_wait_s=-1)
