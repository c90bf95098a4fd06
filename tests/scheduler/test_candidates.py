"""Candidate pools and exact pruning: a pruned profile picks what scoring every candidate picks."""

import dataclasses
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.scheduler.filters import HealthFilter
from meshd.scheduler.policy import Profile
from meshd.scheduler.profiles import BUILTIN, build_profile
from meshd.scheduler.scorers import ExpertAffinityScorer, LoadScorer, PrefixScorer, SLOScorer
from meshd.scheduler.types import RequestView, Role, WorkerView


def make_worker(wid: str, **kw: object) -> WorkerView:
    kw.setdefault("role", Role.BOTH)
    kw.setdefault("model", "m")
    return WorkerView(wid, **kw)  # type: ignore[arg-type]


def make_request(**kw: object) -> RequestView:
    kw.setdefault("model", "m")
    kw.setdefault("num_prompt_tokens", 64)
    kw.setdefault("block_hashes", ())
    return RequestView("r", **kw)  # type: ignore[arg-type]


def make_pair(name: str, shortlist: int) -> tuple[Profile, Profile]:
    """The built-in profile `name`, pruned with `shortlist` and unpruned."""
    full = build_profile(BUILTIN[name], name)
    pruned = build_profile(BUILTIN[name], name)
    pruned._shortlist = shortlist  # build_profile keeps the default; tests stress small ones
    full._shortlist = None
    return pruned, full


COSTS = [{}, {}, {"prefill_ms_per_token": 0.2}, {"decode_ms_per_kctx": 0.5, "decode_base_ms": 2.0},
         {"prefill_ms_per_token": -0.01}, {"queue_ms_per_waiting": 5.0}]

worker_st: st.SearchStrategy[dict[str, object]] = st.builds(
    dict,
    role=st.sampled_from(list(Role)),
    healthy=st.booleans(),
    model=st.sampled_from(["m", "m", "m", "x"]),
    num_running=st.integers(0, 200),
    num_waiting=st.integers(0, 30),
    num_waiting_tokens=st.sampled_from([0, 1, 8192]) | st.integers(0, 10**7),
    kv_usage=st.sampled_from([0.0, 0.25, 0.5, 0.9, 1.0]) | st.floats(0.0, 1.0),
    kv_capacity_blocks=st.sampled_from([0, 100, 20000]),
    block_size=st.sampled_from([16, 32]),
    experts=st.sampled_from([frozenset(), frozenset({1}), frozenset({1, 2})]),
    cost=st.sampled_from(COSTS),
)
request_st: st.SearchStrategy[dict[str, object]] = st.builds(
    dict,
    num_prompt_tokens=st.integers(0, 8192),
    cached=st.dictionaries(st.integers(0, 15), st.integers(0, 200), max_size=6),
    experts=st.sampled_from([{}, {1: 30, 2: 10}, {3: 5}]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(worker_st, min_size=1, max_size=16), st.lists(request_st, min_size=1, max_size=4),
       st.sampled_from(["decode", "prefill", "least_loaded"]), st.integers(1, 3))
def test_pruned_pick_equals_full_evaluation(workers: list[dict[str, object]],
                                            requests: list[dict[str, object]], name: str,
                                            shortlist: int) -> None:
    views = [make_worker(f"w{i:02d}", **kw) for i, kw in enumerate(workers)]
    pruned, full = make_pair(name, shortlist)
    for kw in [requests[0], *requests]:  # the first repeats: the pool prunes from its 2nd use
        cached = {f"w{i:02d}": n for i, n in kw["cached"].items()}  # type: ignore[attr-defined]
        req = make_request(num_prompt_tokens=kw["num_prompt_tokens"], cached_blocks=cached,
                           experts=kw["experts"])
        try:
            want = full.select(req, views)
        except Exception as e:
            with pytest.raises(type(e)):
                pruned.select(req, views)
            continue
        got = pruned.select(req, views)
        assert got.worker_id == want.worker_id
        assert got.worker is not None and got.worker.worker_id == got.worker_id
        assert {k: want.scores[k] for k in got.scores} == got.scores  # bit-identical totals


def test_tie_among_skipped_falls_back_to_full_scoring() -> None:
    prof = Profile("p", [HealthFilter()], [(LoadScorer(), 1.0)], _max_picker(), shortlist=1)
    views = [make_worker(w) for w in ("c", "b", "a")]  # equal load: the pick is the smallest id
    req = make_request()
    assert prof.select(req, views).worker_id == "a"  # 1st use: full
    sel = prof.select(req, views)  # 2nd: shortlist [a]; b's bound ties a's total -> full
    assert sel.worker_id == "a" and set(sel.scores) == {"a", "b", "c"}
    assert prof.stats["scorer:load"].calls == 3


def test_shortlist_scores_cached_workers_and_best_bounded() -> None:
    prof = Profile("p", [HealthFilter()], [(PrefixScorer(), 2.0), (LoadScorer(), 1.0)],
                   _max_picker(), shortlist=1)
    views = [make_worker("a", num_waiting=16), make_worker("b", num_waiting=8), make_worker("c")]
    req = make_request(cached_blocks={"a": 4})
    prof.select(req, views)
    sel = prof.select(req, views)
    assert sel.worker_id == "a"
    assert sel.scores == {"a": 2.0 + (1.0 - 0.5), "c": 1.0}  # b skipped: bound 0.75 < 2.5
    assert prof.stats["scorer:prefix"].calls == 2


def test_filter_output_reused_only_for_the_same_views() -> None:
    prof = Profile("p", [HealthFilter(), _Unkeyed()], [(LoadScorer(), 1.0)], _max_picker())
    views = [make_worker("a"), make_worker("b", healthy=False)]
    for _ in range(3):
        assert prof.select(make_request(), views).worker_id == "a"
    assert (prof.stats["filter:health"].calls, prof.stats["filter:health"].cached) == (3, 0)
    keyed = Profile("k", [HealthFilter()], [(LoadScorer(), 1.0)], _max_picker())
    for vs in (views, views, list(views), [dataclasses.replace(v) for v in views]):
        keyed.select(make_request(), vs)
    # same objects in a new list still hit; equal but new view objects do not
    assert (keyed.stats["filter:health"].calls, keyed.stats["filter:health"].cached) == (2, 2)


def test_failed_filter_output_is_not_kept() -> None:
    flaky = _Flaky()
    prof = Profile("p", [flaky], [(LoadScorer(), 1.0)], _max_picker())
    views = [make_worker("a"), make_worker("b", healthy=False)]
    assert prof.select(make_request(), views).worker_id == "a"  # filter failed: all kept
    prof.select(make_request(), views)
    assert prof.stats["filter:flaky"].calls == 2 and prof.stats["filter:flaky"].failures == 1


@pytest.mark.parametrize("n", [0, 1, 64, 4096])
@pytest.mark.parametrize("queued", [0, 5000])
@pytest.mark.parametrize("scorer", [PrefixScorer(), LoadScorer(), LoadScorer(tokens_weight=1.0),
                                    SLOScorer(),
                                    SLOScorer(phase="prefill"), SLOScorer(phase="decode"),
                                    ExpertAffinityScorer()])
@pytest.mark.parametrize("cost", COSTS)
def test_upper_bound_holds_for_uncached_requests(scorer: object, n: int,
                                                 cost: dict[str, float], queued: int) -> None:
    w = make_worker("a", num_running=7, num_waiting=3, kv_usage=0.4, kv_capacity_blocks=500,
                    experts=frozenset({1}), cost=cost, num_waiting_tokens=queued)
    req = make_request(num_prompt_tokens=n, cached_blocks={"other": 3}, experts={1: 2, 2: 2})
    got = scorer.score(req, [w]).get("a", 0.0)  # type: ignore[attr-defined]
    assert min(got, 1.0) <= scorer.upper_bound(w)  # type: ignore[attr-defined]


def test_bounds_table() -> None:
    w = make_worker("a", num_running=64, num_waiting=8, kv_usage=0.5)
    assert LoadScorer().upper_bound(w) == 1.0 - (0.5 * 0.5 + 0.2 * 0.5 + 0.3 * 0.5)
    assert PrefixScorer().upper_bound(w) == 0.0 and ExpertAffinityScorer().upper_bound(w) == 1.0
    # TTFT at an empty prompt: 60*8 + 4 = 484 of 1000
    assert SLOScorer(phase="prefill").upper_bound(w) == 1.0 - 484.0 / 1000.0
    # queued tokens: 8192 of scale 8192 is 1/2 of the token term (weight 1 of 2)
    wq = make_worker("a", num_running=64, num_waiting=8, kv_usage=0.5, num_waiting_tokens=8192)
    assert LoadScorer(tokens_weight=1.0).upper_bound(wq) == 1.0 - (
        0.5 / 2 / 16 * 8 + 0.2 / 2 / 128 * 64 + 0.3 / 2 * 0.5 + 0.5 * 0.5)
    # TTFT queue from tokens: 0.06*8192 + 4 = 495.52 of 1000
    assert SLOScorer(phase="prefill").upper_bound(wq) == 1.0 - (0.06 * 8192 + 4.0) / 1000.0
    neg = make_worker("a", cost={"decode_ms_per_kctx": -1.0})
    assert SLOScorer().upper_bound(neg) == 1.0


def _max_picker() -> object:
    from meshd.scheduler.pickers import MaxScorePicker

    return MaxScorePicker()


class _Unkeyed:
    name = "unkeyed"

    def filter(self, request: RequestView, workers: Sequence[WorkerView]) -> list[WorkerView]:
        return list(workers)


class _Flaky:
    name = "flaky"

    def __init__(self) -> None:
        self.broken = True

    def request_key(self, request: RequestView) -> None:
        return None

    def filter(self, request: RequestView, workers: Sequence[WorkerView]) -> list[WorkerView]:
        if self.broken:
            self.broken = False
            raise RuntimeError("flaky")
        return [w for w in workers if w.healthy]
