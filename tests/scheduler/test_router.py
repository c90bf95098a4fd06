import dataclasses

import pytest

from meshd.scheduler.baselines import ApproxTreeSelector
from meshd.scheduler.kv_events import BlockStored
from meshd.scheduler.pd import PDConfig, PDDecider
from meshd.scheduler.prefix_index import PrefixIndex
from meshd.scheduler.profiles import builtin
from meshd.scheduler.router import Router
from meshd.scheduler.types import Decision, RequestView, Role, WorkerView


def picks(d: Decision) -> Decision:
    """The decision without the selectors' scores (what these tests compare)."""
    return d._replace(decode_scores=None, prefill_scores=None)


def make_worker(wid: str, role: Role = Role.BOTH, **kw: object) -> WorkerView:
    return WorkerView(wid, role, "m", **kw)  # type: ignore[arg-type]


def make_request(n_blocks: int, **kw: object) -> RequestView:
    return RequestView("r", "m", n_blocks * 16, list(range(1, n_blocks + 1)), **kw)  # type: ignore[arg-type]


def make_router(index: PrefixIndex, cfg: PDConfig | None = None) -> Router:
    return Router(builtin("decode"), builtin("prefill"), PDDecider(cfg), index)


POOL = [make_worker("p0", Role.PREFILL), make_worker("p1", Role.PREFILL, num_waiting=20),
        make_worker("d0", Role.DECODE), make_worker("d1", Role.DECODE)]


def test_long_uncached_prompt_is_disaggregated_to_cached_prefill_worker() -> None:
    index = PrefixIndex()
    index.apply_events("p1", [BlockStored(tuple(range(1, 41)), None, (), 16)])
    index.apply_events("p0", [BlockStored(tuple(range(1, 11)), None, (), 16)])
    d = make_router(index).decide(make_request(64), POOL)
    # p1 holds more but is overloaded (waiting 20); p0 still wins on prefix+load+slo
    assert picks(d) == Decision("p0", "d0", True, 160)


def test_decode_worker_with_cached_prefix_colocates() -> None:
    index = PrefixIndex()
    index.apply_events("d1", [BlockStored(tuple(range(1, 61)), None, (), 16)])
    decision = make_router(index).decide(make_request(64), POOL)
    assert picks(decision) == Decision("d1", "d1", False, 960)


@pytest.mark.parametrize(("pool", "n_blocks", "reason"), [
    (POOL, 8, "short_prefill"),
    ([make_worker("p", Role.PREFILL, num_waiting=99), make_worker("d", Role.DECODE)], 64,
     "no_prefill_headroom"),
    (POOL, 64, "long_prefill"),
    # all-BOTH pools: a shared worker takes the prefill only when the decode worker (the first
    # one here) has >= 16384 more prompt tokens queued (PDConfig.shared_queue_gap_tokens)
    ([make_worker("d"), make_worker("b")], 64, "decode_not_backed_up"),
    ([make_worker("d", num_waiting_tokens=20000), make_worker("b", num_waiting_tokens=3617)], 64,
     "decode_not_backed_up"),
    ([make_worker("d", num_waiting_tokens=20000), make_worker("b", num_waiting_tokens=3616)], 64,
     "decode_backed_up"),
    ([make_worker("d", num_waiting_tokens=20000), make_worker("b", num_waiting=9)], 64,
     "no_prefill_headroom"),
    ([make_worker("d", num_waiting_tokens=20000), make_worker("b")], 8, "short_prefill"),
    # a dedicated prefill worker is used whatever the queues
    ([make_worker("d", Role.DECODE), make_worker("b", num_waiting_tokens=40000),
      make_worker("p", Role.PREFILL, num_waiting_tokens=40000)], 64, "long_prefill"),
])
def test_pd_decider_reasons(pool: list[WorkerView], n_blocks: int, reason: str) -> None:
    d = pool[0] if pool[0].role is not Role.PREFILL else next(
        w for w in pool if w.role is Role.DECODE)
    choice = PDDecider().decide(make_request(n_blocks), d, pool)
    assert choice.reason == reason
    assert choice.disaggregate is (reason in ("long_prefill", "decode_backed_up"))


@pytest.mark.parametrize(("tokens", "reason"), [(16, "no_full_block"), (17, "long_prefill")])
def test_prompt_without_a_full_block_to_move_stays_local(tokens: int, reason: str) -> None:
    """The decode worker always computes the last prompt token itself, so a prompt of
    block_size tokens or fewer has nothing to transfer."""
    req = RequestView("r", "m", tokens, ())
    choice = PDDecider(PDConfig(min_uncached_tokens=0)).decide(req, POOL[2], POOL)
    assert choice.reason == reason


def test_pd_config_validation() -> None:
    with pytest.raises(ValueError, match="shared_queue_gap_tokens"):
        PDConfig(shared_queue_gap_tokens=0)


def test_colocated_cluster_disaggregates_only_a_backed_up_decode_pick() -> None:
    index = PrefixIndex()
    index.apply_events("a", [BlockStored(tuple(range(1, 41)), None, (), 16)])
    router = make_router(index)
    idle = [make_worker("a"), make_worker("b")]
    assert picks(router.decide(make_request(128), idle)) == Decision("a", "a", False, 640)
    # the prefix keeps the decode pick on `a`; `b` has 30k fewer prompt tokens queued and,
    # with no prefill backlog, the better TTFT headroom: it prefills, `a` decodes
    backed = [make_worker("a", num_waiting_tokens=30000), make_worker("b")]
    assert picks(router.decide(make_request(128), backed)) == Decision("b", "a", True, 0)


def test_baselines_drive_the_same_router() -> None:
    ws = [make_worker("a"), make_worker("b", num_waiting=5)]
    rr = Router(builtin("round_robin"))
    assert [rr.decide(make_request(4), ws).decode for _ in range(3)] == ["a", "b", "a"]
    assert Router(builtin("least_loaded")).decide(make_request(4), ws).decode == "a"


def test_approx_tree_prefers_remembered_prefix_then_balances() -> None:
    sel = ApproxTreeSelector(cache_threshold=0.5, balance_abs_threshold=4)
    ws = [make_worker("a"), make_worker("b")]
    assert sel.select(make_request(8), ws).worker_id == "a"  # both empty: smallest tree, id
    assert sel.select(make_request(4), ws).worker_id == "a"  # full match on a
    other = RequestView("x", "m", 64, [100, 101])
    assert sel.select(other, ws).worker_id == "b"  # no match: smaller tree
    busy = [make_worker("a", num_waiting=50), make_worker("b")]
    assert sel.select(make_request(8), busy).worker_id == "b"  # imbalance: shortest queue
    sel.check_integrity()


def test_with_cached_blocks_copies_every_field() -> None:
    req = RequestView("r", "m", 48, (1, 2, 3), max_tokens=9, experts={1: 2},
                      attributes={"tenant": "t"}, cached_blocks={"a": 1}, token_ids=(5, 6),
                      cache_hint_tokens=32)
    assert req.with_cached_blocks({"b": 2}) == dataclasses.replace(req, cached_blocks={"b": 2})
    # every field above differs from its default, so a field added later must be copied too
    assert all(getattr(req, f.name) != f.default for f in dataclasses.fields(req)
               if f.default is not dataclasses.MISSING)


def test_decide_reuses_views_and_stays_exact_across_calls() -> None:
    index = PrefixIndex()
    index.apply_events("p1", [BlockStored(tuple(range(1, 41)), None, (), 16)])
    index.apply_events("p0", [BlockStored(tuple(range(1, 11)), None, (), 16)])
    router = make_router(index)
    for _ in range(3):  # candidate pools reused from the 2nd call on
        assert picks(router.decide(make_request(64), POOL)) == Decision("p0", "d0", True, 160)
