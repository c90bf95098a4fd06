import random
from collections.abc import Sequence

import pytest

from meshd.scheduler.filters import HealthFilter, ModelFilter, RoleFilter
from meshd.scheduler.pickers import MaxScorePicker, PowerOfTwoPicker, RoundRobinPicker
from meshd.scheduler.policy import Profile, clamp01
from meshd.scheduler.profiles import build_profile, builtin
from meshd.scheduler.scorers import ExpertAffinityScorer, LoadScorer, PrefixScorer, SLOScorer
from meshd.scheduler.types import NoWorkerAvailable, RequestView, Role, WorkerView


def make_worker(wid: str, **kw: object) -> WorkerView:
    kw.setdefault("role", Role.BOTH)
    kw.setdefault("model", "m")
    return WorkerView(wid, **kw)  # type: ignore[arg-type]


def make_request(**kw: object) -> RequestView:
    kw.setdefault("model", "m")
    kw.setdefault("num_prompt_tokens", 64)
    kw.setdefault("block_hashes", ())
    return RequestView("r", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("flt", "workers", "expect"), [
    (HealthFilter(), [make_worker("a"), make_worker("b", healthy=False)], ["a"]),
    (ModelFilter(), [make_worker("a"), make_worker("b", model="x")], ["a"]),
    (RoleFilter("prefill"), [make_worker("p", role=Role.PREFILL),
                             make_worker("d", role=Role.DECODE), make_worker("b")], ["p", "b"]),
    (RoleFilter("decode"), [make_worker("p", role=Role.PREFILL),
                            make_worker("d", role=Role.DECODE), make_worker("b")], ["d", "b"]),
    (RoleFilter("both"), [make_worker("p", role=Role.PREFILL), make_worker("b")], ["b"]),
])
def test_filters(flt: object, workers: list[WorkerView], expect: list[str]) -> None:
    out = flt.filter(make_request(), workers)  # type: ignore[attr-defined]
    assert [w.worker_id for w in out] == expect


def test_role_filter_rejects_unknown_role() -> None:
    with pytest.raises(ValueError, match="role must be one of"):
        RoleFilter("bogus")


@pytest.mark.parametrize(("scorer", "request_kw", "workers", "expect"), [
    (PrefixScorer(), {"cached_blocks": {"a": 2, "b": 10}},
     [make_worker("a"), make_worker("b"), make_worker("c")], {"a": 0.5, "b": 1.0}),
    (PrefixScorer(), {"num_prompt_tokens": 0, "cached_blocks": {"a": 1}}, [make_worker("a")], {}),
    (LoadScorer(), {}, [make_worker("a"), make_worker("b", num_waiting=8, num_running=64,
                                                      kv_usage=0.5)],
     {"a": 1.0, "b": 1.0 - (0.5 * 0.5 + 0.2 * 0.5 + 0.3 * 0.5)}),
    (LoadScorer(), {}, [make_worker("a", num_waiting=100, num_running=1000, kv_usage=1.0)],
     {"a": 0.0}),
    # queued tokens count only when weighted: 8192 of scale 8192 -> 1/2 of weight 1 of 2
    (LoadScorer(), {}, [make_worker("a", num_waiting_tokens=8192)], {"a": 1.0}),
    (LoadScorer(tokens_weight=1.0), {},
     [make_worker("a"), make_worker("b", num_waiting=8, num_running=64, kv_usage=0.5,
                                     num_waiting_tokens=8192)],
     {"a": 1.0, "b": 1.0 - (0.5 / 2 / 16 * 8 + 0.2 / 2 / 128 * 64 + 0.3 / 2 * 0.5 + 0.5 * 0.5)}),
    (LoadScorer(tokens_weight=1.0, tokens_scale=1000), {},
     [make_worker("a", num_waiting_tokens=3000)], {"a": 1.0 - 0.5 * 0.75}),
    (ExpertAffinityScorer(), {"experts": {1: 30, 2: 10}},
     [make_worker("a", experts=frozenset({1})), make_worker("b", experts=frozenset({3})),
      make_worker("c")], {"a": 0.75, "b": 0.0, "c": 1.0}),
    (ExpertAffinityScorer(), {}, [make_worker("a", experts=frozenset({1}))], {"a": 1.0}),
    # TTFT: 60*2 + 4 + 0.06*(64-32) = 125.92 of 1000 -> 0.87408
    (SLOScorer(phase="prefill"), {"cached_blocks": {"a": 2}},
     [make_worker("a", num_waiting=2)], {"a": pytest.approx(1 - 125.92 / 1000)}),
    # queued tokens replace the per-request queue estimate: 0.06*1000 + 4 + 0.06*32 = 65.92
    (SLOScorer(phase="prefill"), {"cached_blocks": {"a": 2}},
     [make_worker("a", num_waiting=2, num_waiting_tokens=1000)],
     {"a": pytest.approx(1 - 65.92 / 1000)}),
    # ITL: 7 + 0.04*4 + 0.015*(0.5*100*16+64)/1000 = 7.17296 of 50
    (SLOScorer(phase="decode"), {},
     [make_worker("a", num_running=3, kv_usage=0.5, kv_capacity_blocks=100)],
     {"a": pytest.approx(1 - 7.17296 / 50)}),
    (SLOScorer(itl_slo_ms=5.0), {}, [make_worker("a")], {"a": 0.0}),
    (SLOScorer(phase="prefill"), {}, [make_worker("a", cost={"prefill_ms_per_token": 1.0})],
     {"a": pytest.approx(1 - 68 / 1000)}),
])
def test_scorers(scorer: object, request_kw: dict[str, object], workers: list[WorkerView],
                 expect: dict[str, float]) -> None:
    assert scorer.score(make_request(**request_kw), workers) == expect  # type: ignore[attr-defined]


def test_load_scorer_token_term_does_not_saturate() -> None:
    scorer = LoadScorer(tokens_weight=1.0)
    queued = [0, 1, 8192, 10**6, 10**8]
    ws = [make_worker(f"w{i}", num_waiting=99, num_waiting_tokens=q) for i, q in enumerate(queued)]
    got = scorer.score(make_request(), ws)
    assert [got[w.worker_id] for w in ws] == sorted(got.values(), reverse=True)
    assert len(set(got.values())) == len(queued) and min(got.values()) > 0.0
    with pytest.raises(ValueError, match="tokens_scale"):
        LoadScorer(tokens_scale=0)
    with pytest.raises(ValueError, match=">= 0"):
        LoadScorer(tokens_weight=-1.0)


def test_pickers() -> None:
    req = make_request()
    assert MaxScorePicker().pick(req, {"b": 1.0, "a": 1.0, "c": 0.5}) == "a"
    rr = RoundRobinPicker()
    assert [rr.pick(req, {"b": 0.0, "a": 9.0}) for _ in range(3)] == ["a", "b", "a"]
    p2c = PowerOfTwoPicker(random.Random(1))
    picks = [p2c.pick(req, {"a": 0.0, "b": 1.0, "c": 0.5}) for _ in range(50)]
    assert "a" not in picks and set(picks) == {"b", "c"}
    assert PowerOfTwoPicker(seed=3).pick(req, {"x": 0.0}) == "x"


class Boom:
    name = "boom"

    def filter(self, request: RequestView, workers: Sequence[WorkerView]) -> list[WorkerView]:
        raise RuntimeError("filter broke")

    def score(self, request: RequestView, workers: Sequence[WorkerView]) -> dict[str, float]:
        raise RuntimeError("scorer broke")

    def pick(self, request: RequestView, scores: object) -> str:
        raise RuntimeError("picker broke")


class Wild:
    name = "wild"

    def score(self, request: RequestView, workers: Sequence[WorkerView]) -> dict[str, float]:
        return {"a": 7.0, "b": -3.0, "c": float("nan")}


def test_raising_plugins_are_skipped_and_counted() -> None:
    prof = Profile("p", [Boom(), HealthFilter()], [(Boom(), 5.0), (Wild(), 2.0)], Boom())
    ws = [make_worker("a"), make_worker("b"), make_worker("c"), make_worker("d", healthy=False)]
    sel = prof.select(make_request(), ws)
    assert sel.worker_id == "a"
    assert sel.scores == {"a": 2.0, "b": 0.0, "c": 0.0}
    assert prof.stats["filter:boom"].failures == 1
    assert prof.stats["scorer:boom"].failures == 1 and prof.stats["picker:boom"].failures == 1
    assert prof.stats["scorer:wild"].calls == 1 and prof.stats["scorer:wild"].failures == 0
    assert "scorer broke" in prof.stats["scorer:boom"].last_error


def test_clamp() -> None:
    assert [clamp01(v) for v in (-1.0, 0.25, 2.0, float("nan"))] == [0.0, 0.25, 1.0, 0.0]


def test_build_profile_from_config_and_errors() -> None:
    prof = build_profile({"filters": ["health", {"type": "role", "role": "decode"}],
                          "scorers": [{"type": "prefix", "weight": 2.0},
                                      {"type": "load", "parameters": {"max_waiting": 4}}],
                          "picker": {"type": "max"}})
    assert [f.name for f in prof.filters] == ["health", "role-decode"]
    assert [(s.name, w) for s, w in prof.scorers] == [("prefix", 2.0), ("load", 1.0)]
    with pytest.raises(ValueError, match="valid: expert, load, prefix, slo"):
        build_profile({"scorers": [{"type": "nope"}]})
    with pytest.raises(ValueError, match="bad parameters"):
        build_profile({"scorers": [{"type": "load", "bogus": 1}]})
    with pytest.raises(ValueError, match="weight"):
        build_profile({"scorers": [{"type": "load", "weight": -1}]})
    with pytest.raises(ValueError, match="valid:"):
        builtin("nope")


def test_no_worker_available() -> None:
    with pytest.raises(NoWorkerAvailable):
        builtin("least_loaded").select(make_request(model="zzz"), [make_worker("a")])
