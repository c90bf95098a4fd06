"""Roles are preferences: with no worker of the preferred role left, the router still decodes
(on a prefill worker), and P/D resumes once a decode worker is back."""

import pytest

from meshd.scheduler.filters import RoleFilter
from meshd.scheduler.pd import PDConfig, PDDecider
from meshd.scheduler.prefix_index import PrefixIndex
from meshd.scheduler.profiles import build_profile, builtin
from meshd.scheduler.router import Router
from meshd.scheduler.types import NoWorkerAvailable, RequestView, Role, WorkerView


def make_worker(wid: str, role: Role, healthy: bool = True) -> WorkerView:
    return WorkerView(wid, role, "m", healthy=healthy)


def make_request(tokens: int = 2048) -> RequestView:
    return RequestView("r", "m", tokens, ())


P, D, B = Role.PREFILL, Role.DECODE, Role.BOTH


@pytest.mark.parametrize(("role", "strict", "roles", "expect"), [
    ("decode", False, [P, D, B], ["w1_d", "w2_b"]),
    ("decode", False, [P, P], ["w0_p", "w1_p"]),  # nothing decodes: keep all
    ("decode", True, [P, P], []),
    ("prefill", False, [D, D], ["w0_d", "w1_d"]),
    ("prefill", False, [P, D], ["w0_p"]),
    ("both", False, [P, D], ["w0_p", "w1_d"]),
    ("both", True, [P, D], []),
    ("both", False, [P, B], ["w1_b"]),
])
def test_role_filter_prefers(role: str, strict: bool, roles: list[Role],
                             expect: list[str]) -> None:
    workers = [make_worker(f"w{i}_{r.value[0]}", r) for i, r in enumerate(roles)]
    out = RoleFilter(role, strict=strict).filter(make_request(), workers)
    assert [w.worker_id for w in out] == expect


def test_strict_is_configurable_and_checked() -> None:
    prof = build_profile({"filters": [{"type": "role", "role": "decode", "strict": True}]})
    with pytest.raises(NoWorkerAvailable):
        prof.select(make_request(), [make_worker("p", P)])
    with pytest.raises(ValueError, match="strict must be a boolean"):
        RoleFilter("decode", strict="yes")  # type: ignore[arg-type]


def make_router() -> Router:
    return Router(decode=builtin("decode"), prefill=builtin("prefill"),
                  pd=PDDecider(PDConfig(min_uncached_tokens=0)), index=PrefixIndex())


def test_decode_worker_gone_then_back() -> None:
    router = make_router()
    up = [make_worker("p0", P), make_worker("d0", D)]
    d = router.decide(make_request(), up)
    assert (d.prefill, d.decode, d.disaggregated) == ("p0", "d0", True)
    down = [make_worker("p0", P), make_worker("d0", D, healthy=False)]
    d = router.decide(make_request(), down)
    assert (d.prefill, d.decode, d.disaggregated) == ("p0", "p0", False)
    d = router.decide(make_request(), [make_worker("p0", P)])  # gone from membership too
    assert (d.decode, d.disaggregated) == ("p0", False)
    d = router.decide(make_request(), up)
    assert (d.prefill, d.decode, d.disaggregated) == ("p0", "d0", True)


def test_no_healthy_worker_at_all_is_still_no_worker() -> None:
    with pytest.raises(NoWorkerAvailable):
        make_router().decide(make_request(), [make_worker("p0", P, healthy=False)])
