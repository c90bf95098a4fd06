"""`ResponseStore`: tenant privacy, LRU eviction by entries and bytes, TTL expiry, refusals.

Each case is a script of steps on a store with a fake clock; every step's result is exact and
the store's integrity is checked after each one."""

from __future__ import annotations

import random
from typing import Any

import pytest

from meshd.coordinator.gateway.serving.response_store import ResponseStore, ResponseStoreStats


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_store(max_entries: int = 3, max_bytes: int = 100,
               ttl_s: float = 10.0) -> tuple[ResponseStore, FakeClock]:
    clock = FakeClock()
    return ResponseStore(max_entries, max_bytes, ttl_s, clock=clock), clock


Step = tuple[Any, ...]

# Steps: ("put", id, size, tenant, stored?), ("get", id, tenant, value or None),
# ("delete", id, tenant, removed?), ("tick", seconds), ("ids", [ids held, LRU first]),
# ("stats", entries, bytes, evicted, expired, refused). A put's value is f"v-{id}-{size}".
CASES: list[tuple[str, dict[str, Any], list[Step]]] = [
    ("private to the tenant", {}, [
        ("put", "r1", 5, "acme", True), ("get", "r1", "acme", "v-r1-5"),
        ("get", "r1", "globex", None), ("get", "r1", None, None), ("get", "nope", "acme", None),
        ("put", "r2", 5, None, True), ("get", "r2", None, "v-r2-5"), ("get", "r2", "acme", None),
        ("stats", 2, 10, 0, 0, 0)]),
    ("LRU by entries", {"max_entries": 2}, [
        ("put", "a", 1, "t", True), ("put", "b", 1, "t", True), ("get", "a", "t", "v-a-1"),
        ("put", "c", 1, "t", True), ("ids", ["a", "c"]), ("get", "b", "t", None),
        ("stats", 2, 2, 1, 0, 0)]),
    ("another tenant's get does not refresh", {"max_entries": 2}, [
        ("put", "a", 1, "t", True), ("put", "b", 1, "t", True), ("get", "a", "u", None),
        ("put", "c", 1, "t", True), ("ids", ["b", "c"])]),
    ("LRU by bytes", {"max_bytes": 10}, [
        ("put", "a", 4, "t", True), ("put", "b", 4, "t", True), ("put", "c", 4, "t", True),
        ("ids", ["b", "c"]), ("put", "d", 9, "t", True), ("ids", ["d"]),
        ("stats", 1, 9, 3, 0, 0)]),
    ("exactly max_bytes fits", {"max_bytes": 10}, [
        ("put", "a", 3, "t", True), ("put", "b", 10, "t", True), ("ids", ["b"]),
        ("put", "z", 0, "t", True), ("ids", ["b", "z"]), ("stats", 2, 10, 1, 0, 0)]),
    ("larger than max_bytes is refused", {"max_bytes": 10}, [
        ("put", "a", 3, "t", True), ("put", "big", 11, "t", False), ("ids", ["a"]),
        ("get", "big", "t", None), ("stats", 1, 3, 0, 0, 1)]),
    ("replace own entry", {"max_bytes": 10}, [
        ("put", "a", 3, "t", True), ("put", "b", 3, "t", True), ("put", "a", 7, "t", True),
        ("ids", ["b", "a"]), ("get", "a", "t", "v-a-7"), ("stats", 2, 10, 0, 0, 0)]),
    ("another tenant's id is refused", {}, [
        ("put", "a", 3, "t", True), ("put", "a", 4, "u", False), ("get", "a", "t", "v-a-3"),
        ("get", "a", "u", None), ("stats", 1, 3, 0, 0, 1)]),
    ("expiry on get, at exactly ttl", {"ttl_s": 10.0}, [
        ("put", "a", 2, "t", True), ("tick", 9.5), ("get", "a", "t", "v-a-2"),
        ("tick", 0.5), ("ids", ["a"]), ("get", "a", "t", None), ("ids", []),
        ("stats", 0, 0, 0, 1, 0)]),
    ("another tenant's get removes an expired entry too", {"ttl_s": 1.0}, [
        ("put", "a", 2, "t", True), ("tick", 1.0), ("get", "a", "u", None), ("ids", []),
        ("stats", 0, 0, 0, 1, 0)]),
    ("get refreshes recency, not the ttl", {"ttl_s": 10.0, "max_entries": 2}, [
        ("put", "a", 1, "t", True), ("tick", 5), ("put", "b", 1, "t", True),
        ("get", "a", "t", "v-a-1"), ("ids", ["b", "a"]), ("tick", 5),
        ("get", "a", "t", None), ("get", "b", "t", "v-b-1")]),
    ("put sweeps the expired oldest", {"ttl_s": 10.0}, [
        ("put", "a", 1, "t", True), ("tick", 4), ("put", "b", 1, "t", True),
        ("tick", 4), ("put", "c", 1, "t", True), ("get", "a", "t", "v-a-1"),
        ("tick", 3), ("put", "d", 1, "t", True), ("ids", ["b", "c", "d"]),
        ("tick", 20), ("put", "e", 1, "t", True), ("ids", ["e"]),
        ("stats", 1, 1, 0, 4, 0)]),
    ("sweep before eviction frees room", {"ttl_s": 10.0, "max_entries": 2}, [
        ("put", "a", 1, "t", True), ("put", "b", 1, "t", True), ("tick", 10),
        ("put", "c", 1, "t", True), ("ids", ["c"]), ("stats", 1, 1, 0, 2, 0)]),
    ("delete", {}, [
        ("put", "a", 4, "t", True), ("delete", "a", "u", False), ("delete", "nope", "t", False),
        ("get", "a", "t", "v-a-4"), ("delete", "a", "t", True), ("get", "a", "t", None),
        ("delete", "a", "t", False), ("stats", 0, 0, 0, 0, 0)]),
]


def run_step(store: ResponseStore, clock: FakeClock, step: Step) -> None:
    op, *args = step
    if op == "put":
        rid, size, tenant, want = args
        assert store.put(rid, f"v-{rid}-{size}", size, tenant=tenant) is want, step
    elif op == "get":
        rid, tenant, want = args
        assert store.get(rid, tenant=tenant) == want, step
    elif op == "delete":
        rid, tenant, want = args
        assert store.delete(rid, tenant=tenant) is want, step
    elif op == "tick":
        clock.now += args[0]
    elif op == "ids":
        assert list(store._lru) == args[0], step
        assert len(store) == len(args[0])
    else:
        assert store.stats() == ResponseStoreStats(*args), step
        assert store.bytes_used == args[1]


@pytest.mark.parametrize(("config", "steps"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_script(config: dict[str, Any], steps: list[Step]) -> None:
    store, clock = make_store(**config)
    for step in steps:
        run_step(store, clock, step)
        store.check_integrity()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_entries": 0}, "max_entries must be >= 1, got 0"),
    ({"max_bytes": 0}, "max_bytes must be >= 1, got 0"),
    ({"ttl_s": 0.0}, "ttl_s must be > 0, got 0.0"),
    ({"ttl_s": float("nan")}, "ttl_s must be > 0, got nan"),
])
def test_config_is_validated(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as e:
        make_store(**kwargs)
    assert str(e.value) == message


def test_negative_size_is_an_error() -> None:
    store, _ = make_store()
    with pytest.raises(ValueError, match="size must be >= 0, got -1"):
        store.put("a", "v", -1, tenant=None)


def test_random_operations_keep_integrity() -> None:
    """A seeded mix of puts, gets, deletes and ticks: the bounds and accounting always hold."""
    rng = random.Random(3)
    store, clock = make_store(max_entries=8, max_bytes=60, ttl_s=5.0)
    for _ in range(3000):
        rid, tenant = f"r{rng.randrange(20)}", rng.choice(["a", "b", None])
        op = rng.randrange(4)
        if op == 0:
            store.put(rid, rid, rng.randrange(0, 70), tenant=tenant)
        elif op == 1:
            store.get(rid, tenant=tenant)
        elif op == 2:
            store.delete(rid, tenant=tenant)
        else:
            clock.now += rng.random()
        store.check_integrity()
    stats = store.stats()
    assert stats.evicted > 0 and stats.expired > 0 and stats.refused > 0
