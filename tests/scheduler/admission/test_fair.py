"""VTC fair queue: fast path, FIFO, counter lift, weighted shares, priority, refusal, expiry."""

from __future__ import annotations

import random
from typing import Any

import pytest

from meshd.scheduler.admission.fair import FairConfig, FairQueue, Ticket

Item = tuple[str, int]  # (tenant, index): what a test queues as the opaque item


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_queue(max_active: int = 1, clock: FakeClock | None = None,
               **config: Any) -> FairQueue[Item]:
    return FairQueue(FairConfig(max_active=max_active, **config), clock or FakeClock())


def make_backlog(q: FairQueue[Item], tenant: str, n: int, weight: float = 1.0,
                 priority: int = 1, cost: float = 1.0) -> list[Ticket[Item]]:
    tickets = [q.enqueue(tenant, priority, weight, cost, (tenant, i)) for i in range(n)]
    assert all(t is not None for t in tickets)
    return [t for t in tickets if t is not None]


def make_run(q: FairQueue[Item], running: str, steps: int, cost: float = 1.0) -> list[str]:
    """max_active=1: release the running request `steps` times (actual == charged == cost);
    return the tenants dispatched, in order, checking integrity after every step."""
    order = []
    for _ in range(steps):
        (item,) = q.release(running, cost, cost)
        running = item[0]
        order.append(running)
        q.check_integrity()
    return order


def test_fast_path_counts_slots_and_charges_cost_over_weight() -> None:
    q = make_queue(max_active=2)
    assert q.try_enter("a", 1, 1.0, 10.0)
    assert q.try_enter("b", 1, 2.0, 10.0)
    assert not q.try_enter("a", 1, 1.0, 10.0)
    assert q.active == 2 and q.counters() == {"a": 10.0, "b": 5.0} and q.depth() == 0
    q.check_integrity()


def test_max_active_zero_never_queues() -> None:
    q = make_queue(max_active=0)
    assert all(q.try_enter("a", 1, 1.0, 1.0) for _ in range(1000))
    assert q.active == 1000


def test_service_weights_prompt_and_completion() -> None:
    q = make_queue(input_weight=1.0, output_weight=2.0)
    assert q.service(100, 50) == 200.0


def test_enqueue_with_a_free_slot_is_refused_so_queued_requests_are_never_overtaken() -> None:
    q = make_queue(max_active=1)
    with pytest.raises(ValueError, match="call try_enter first"):
        q.enqueue("a", 1, 1.0, 1.0, ("a", 0))
    assert q.try_enter("a", 1, 1.0, 1.0)
    make_backlog(q, "b", 1)
    assert q.release("a", 1.0, 1.0) == [("b", 0)]
    assert not q.try_enter("c", 0, 1.0, 0.0)  # the slot went to the queued request


def test_fifo_within_a_tenant() -> None:
    q = make_queue()
    assert q.try_enter("a", 1, 1.0, 1.0)
    make_backlog(q, "a", 5)
    assert make_run(q, "a", 5) == ["a"] * 5
    assert q.depth() == 0


def test_light_tenant_is_lifted_to_the_flooder_and_neither_starves() -> None:
    q = make_queue()
    assert q.try_enter("a", 1, 1.0, 1.0)
    make_backlog(q, "a", 100)
    assert make_run(q, "a", 1) == ["a"]
    assert q.counters()["a"] == 2.0
    make_backlog(q, "b", 10)
    assert q.counters()["b"] == 2.0  # lifted to the least backlogged counter, no banked credit
    assert make_run(q, "a", 20) == ["b", "a"] * 10  # b next, then a fair alternation
    assert make_run(q, "a", 5) == ["a"] * 5  # b idle: a is served alone
    make_backlog(q, "b", 2)  # b comes back: lifted again, alternates instead of bursting
    assert q.counters()["b"] == q.counters()["a"]
    assert make_run(q, "a", 6) == ["b", "a", "b", "a", "a", "a"]
    assert q.depth("a") == 99 - 10 - 5 - 4


def test_weights_two_to_one_give_two_to_one_service_under_backlog() -> None:
    q = make_queue()
    assert q.try_enter("a", 1, 2.0, 1.0)
    make_backlog(q, "a", 300, weight=2.0)
    make_backlog(q, "b", 300, weight=1.0)
    order = make_run(q, "a", 90)
    assert order[:6] == ["b", "a", "a", "b", "a", "a"]
    assert (order.count("a"), order.count("b")) == (60, 30)


def test_strict_priority_between_classes_ignores_counters() -> None:
    q = make_queue()
    assert q.try_enter("x", 1, 1.0, 1.0)
    make_backlog(q, "low", 2, priority=2, cost=0.0)
    make_backlog(q, "normal", 2, priority=1, cost=0.0)
    make_backlog(q, "high", 2, priority=0, cost=1000.0)
    assert make_run(q, "x", 6, cost=0.0) == ["high"] * 2 + ["normal"] * 2 + ["low"] * 2


def test_max_queued_refuses_past_the_bound() -> None:
    q = make_queue(max_queued=3)
    assert q.try_enter("a", 1, 1.0, 1.0)
    make_backlog(q, "a", 2)
    make_backlog(q, "b", 1)
    assert q.enqueue("c", 0, 1.0, 1.0, ("c", 0)) is None
    assert (q.depth(), q.depth("a"), q.depth("b"), q.depth("c")) == (3, 2, 1, 0)
    q.check_integrity()


def test_cancel_removes_only_queued_entries() -> None:
    q = make_queue()
    assert q.try_enter("a", 1, 1.0, 1.0)
    tickets = make_backlog(q, "a", 3)
    assert q.cancel(tickets[1]) and not q.cancel(tickets[1])
    assert q.depth() == 2
    assert q.release("a", 1.0, 1.0) == [("a", 0)]
    assert not q.cancel(tickets[0])  # already dispatched
    assert q.release("a", 1.0, 1.0) == [("a", 2)]
    q.check_integrity()


def test_expired_pops_entries_whose_deadline_passed() -> None:
    clock = FakeClock()
    q = make_queue(clock=clock, queue_timeout_s=5.0)
    assert q.try_enter("a", 1, 1.0, 1.0)
    first = make_backlog(q, "a", 1) + make_backlog(q, "b", 1)
    clock.now = 3.0
    make_backlog(q, "c", 1)
    assert [t.deadline for t in first] == [5.0, 5.0]
    clock.now = 4.9
    assert q.expired() == []
    clock.now = 5.0
    assert q.expired() == [("a", 0), ("b", 0)]
    q.check_integrity()
    clock.now = 8.0
    assert q.expired() == [("c", 0)] and q.depth() == 0
    assert q.release("a", 1.0, 1.0) == []
    q.check_integrity()


@pytest.mark.parametrize(("actual", "want_a"), [
    (20.0, 20.0),  # exact estimate: no correction
    (15.0, 15.0),  # over-estimated: refunded
    (0.0, None),  # the refund stops at the floor (10); idle at the floor, a is forgotten
    (40.0, 40.0),  # under-estimated: a owes the difference
])
def test_release_corrects_counter_never_below_floor(actual: float, want_a: float | None) -> None:
    q = make_queue(max_active=2)
    assert q.try_enter("a", 1, 1.0, 20.0) and q.try_enter("b", 1, 1.0, 10.0)
    make_backlog(q, "c", 1, cost=0.0)  # lift with an empty class: floor = least running = 10
    assert q.floor == 10.0 and q.counters()["c"] == 10.0
    assert q.release("a", actual, 20.0) == [("c", 0)]
    assert q.counters().get("a") == want_a and q.counters()["b"] == 10.0
    q.check_integrity()


def test_release_without_an_active_request_is_an_error() -> None:
    q = make_queue()
    with pytest.raises(ValueError, match="no active request"):
        q.release("ghost", 1.0, 1.0)


def test_tenant_state_is_bounded() -> None:
    q = make_queue(max_active=0, max_tenants=3)
    for i in range(10):
        name = f"t{i}"
        assert q.try_enter(name, 1, 1.0, 0.0)
        q.release(name, 0.0, 0.0)
    assert q.counters() == {}  # idle at the floor: forgotten
    for i in range(10):
        name = f"t{i}"
        assert q.try_enter(name, 1, 1.0, 1.0)
        q.release(name, 1.0, 1.0)
        q.check_integrity()
    assert list(q.counters()) == ["t7", "t8", "t9"]  # LRU over idle tenants


@pytest.mark.parametrize(("field", "value", "rule"), [
    ("max_active", -1, ">= 0"),
    ("max_queued", 0, ">= 1"),
    ("queue_timeout_s", 0.0, "> 0"),
    ("input_weight", -0.5, ">= 0"),
    ("output_weight", float("nan"), ">= 0"),
    ("max_tenants", 0, ">= 1"),
])
def test_config_validation_names_the_field(field: str, value: float, rule: str) -> None:
    with pytest.raises(ValueError, match=f"^gateway.governance.fair.{field}: must be {rule}"):
        FairConfig(**{field: value})  # type: ignore[arg-type]


def test_randomized_sequence_keeps_integrity_and_conserves_requests() -> None:
    rng = random.Random(20240611)
    clock = FakeClock()
    q: FairQueue[Item] = FairQueue(FairConfig(max_active=3, max_queued=12, queue_timeout_s=4.0,
                                              max_tenants=5), clock)
    running: list[tuple[str, float]] = []  # (tenant, charged)
    tickets: list[Ticket[Item]] = []
    costs: dict[Item, float] = {}
    admitted = cancelled = expired = refused = 0
    for step in range(4000):
        op = rng.random()
        if op < 0.45:
            tenant, cost = f"t{rng.randrange(8)}", float(rng.randrange(5))
            weight, prio = float(rng.choice((1, 2, 3))), rng.randrange(3)
            if q.try_enter(tenant, prio, weight, cost):
                running.append((tenant, cost))
                admitted += 1
            elif (ticket := q.enqueue(tenant, prio, weight, cost, (tenant, step))) is None:
                refused += 1
            else:
                tickets.append(ticket)
                costs[ticket.item] = cost
        elif op < 0.8 and running:
            tenant, charged = running.pop(rng.randrange(len(running)))
            for item in q.release(tenant, float(rng.randrange(6)), charged):
                running.append((item[0], costs.pop(item)))
                admitted += 1
        elif op < 0.9 and tickets:
            ticket = tickets.pop(rng.randrange(len(tickets)))
            if q.cancel(ticket):
                costs.pop(ticket.item)
                cancelled += 1
        else:
            clock.now += rng.random()
            for item in q.expired():
                costs.pop(item)
                expired += 1
        q.check_integrity()
        assert q.active == len(running) and q.depth() == len(costs)
    assert min(admitted, cancelled, expired, refused) > 0, (admitted, cancelled, expired, refused)


@pytest.mark.parametrize(("weight", "cost", "actual"), [
    (0.0, 1.0, 1.0), (-1.0, 1.0, 1.0), (1.0, -1.0, 1.0), (1.0, float("inf"), 1.0),
    (1.0, 1.0, -1.0),
])
def test_bad_request_numbers_are_refused(weight: float, cost: float, actual: float) -> None:
    q = make_queue()
    with pytest.raises(ValueError, match="fair queue: "):
        q.try_enter("a", 1, weight, cost)
        q.release("a", actual, cost)
    q.check_integrity()
