"""What admission precomputes per tenant (`TenantPlan`): the response's header lines from
templates made at bind time, renewed when a window turns over and dropped by a reload; the
price table's default; the clock's own cost taken out of the in-place timing."""

from __future__ import annotations

from meshd.config import build
from meshd.coordinator.gateway.config import Limits
from meshd.coordinator.gateway.governance.admission import Governor
from meshd.coordinator.gateway.governance.config import GovernanceConfig, build_policy
from meshd.coordinator.gateway.governance.metrics import CpuSample
from meshd.coordinator.gateway.http.api_request import ApiRequest, Endpoint
from meshd.coordinator.gateway.http.openai_api import parse_completion
from meshd.coordinator.ledger_actor import InProcessLedgerClient, LocalLedger
from meshd.scheduler.admission.prices import Price, PriceTable

T0 = 60.0 * 29_000_000 + 15.0  # 15 s into a minute window


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_governor(wall: Clock, **tenant: object) -> Governor:
    cfg = build(GovernanceConfig, {"tenants": {"acme": tenant}, "loops": {"enabled": False}},
                "gateway.governance.")
    return Governor(cfg, InProcessLedgerClient(LocalLedger()), "r0", 1 << 20,
                    clock=Clock(100.0), wall=wall)


def make_request(max_tokens: int | None = 10) -> ApiRequest:
    obj: dict[str, object] = {"model": "m", "prompt": [1, 2, 3, 4, 5]}
    if max_tokens is not None:
        obj["max_tokens"] = max_tokens
    return ApiRequest(Endpoint.COMPLETIONS, "rid", parse_completion(obj, Limits()), obj, b"",
                      "acme", 0.0)


def lines(headers: bytes) -> dict[str, str]:
    out = {}
    for line in headers.decode().split("\r\n"):
        if line:
            k, _, v = line.partition(": ")
            out[k] = v
    return out


async def test_headers_count_down_and_turn_over_with_the_window() -> None:
    wall = Clock(T0)
    gov = make_governor(wall, rpm=100, tpm=10_000)
    first = await gov.admit(make_request(), [1, 2, 3, 4, 5])
    assert lines(first.headers) == {
        "x-meshd-completion-estimate": "max_tokens",
        "x-ratelimit-limit-requests": "100", "x-ratelimit-remaining-requests": "99",
        "x-ratelimit-reset-requests": "45s",
        "x-ratelimit-limit-tokens": "10000", "x-ratelimit-remaining-tokens": "9985",
        "x-ratelimit-reset-tokens": "45s"}
    wall.t = T0 + 30.5
    second = await gov.admit(make_request(), [1, 2, 3, 4, 5])
    got = lines(second.headers)
    assert (got["x-ratelimit-remaining-requests"], got["x-ratelimit-reset-requests"]) == (
        "98", "15s")
    wall.t = T0 + 60.0  # the next minute: new meters, the running requests settle on theirs
    third = await gov.admit(make_request(max_tokens=None), [1, 2, 3, 4, 5])
    got = lines(third.headers)
    assert got["x-meshd-completion-estimate"] == "default;tokens=256"
    assert (got["x-ratelimit-remaining-requests"], got["x-ratelimit-reset-requests"]) == (
        "99", "45s")
    for adm in (first, second, third):
        adm.finish(10, 0)
    assert gov.outstanding == 0 and gov.book.inflight() == 0
    gov.book.check_integrity()


async def test_a_reload_puts_the_new_limits_in_the_headers_and_settles_the_old() -> None:
    wall = Clock(T0)
    gov = make_governor(wall, rpm=100)
    running = await gov.admit(make_request(), [1, 2, 3, 4, 5])
    gov.apply(build_policy({"tenants": {"acme": {"rpm": 50, "models": ["m"]}}}, "test: "))
    adm = await gov.admit(make_request(), [1, 2, 3, 4, 5])
    assert lines(adm.headers)["x-ratelimit-limit-requests"] == "50"
    assert "x-ratelimit-limit-tokens" not in lines(adm.headers)
    running.finish(10, 0)
    adm.finish(10, 0)
    assert gov.outstanding == 0 and gov.book.inflight() == 0


async def test_a_tenant_without_rate_limits_gets_the_estimate_line_only() -> None:
    gov = make_governor(Clock(T0), daily_tokens=1000)
    adm = await gov.admit(make_request(max_tokens=None), [1, 2, 3, 4, 5])
    assert adm.headers == b"x-meshd-completion-estimate: default;tokens=256\r\n"
    adm.finish(3, 0)


def test_a_model_without_a_price_gets_the_default_and_is_not_added() -> None:
    table = PriceTable({"a": Price(1.0, 0.1, 2.0)})
    assert table.of("a") == Price(1.0, 0.1, 2.0) and table.of("b") == Price()
    star = PriceTable({"a": Price(1.0), "*": Price(3.0)})
    assert star.of("zz") == Price(3.0)
    assert table.priced() and sorted(star._prices) == ["*", "a"]  # nothing was added


def test_the_clocks_own_cost_is_taken_out_of_the_mean() -> None:
    c = CpuSample()
    assert c.mean_us() is None and c.net_mean_us() is None
    c.ns, c.samples = 3 * 5000 + 3 * CpuSample.clock_ns(), 3
    assert c.net_mean_us() == 5.0 and 0 < CpuSample.clock_ns() < 100_000
    assert c.clock_us() == round(CpuSample.clock_ns() / 1000, 2)  # none read in place yet


def test_the_clocks_cost_is_read_in_place_between_samples() -> None:
    c = CpuSample()
    starts = [c.start() for _ in range(2 * CpuSample.EVERY)]
    # one real sample and one sample of nothing per EVERY calls, half a period apart
    assert [i for i, t in enumerate(starts, 1) if t] == [CpuSample.EVERY, 2 * CpuSample.EVERY]
    assert c.nulls == 2 and c.null_ns >= 0
    c.ns, c.samples, c.null_ns = 2 * 9000, 2, 2 * 3000  # what in-place nulls read wins
    assert c.clock_us() == 3.0 and c.net_mean_us() == 6.0
