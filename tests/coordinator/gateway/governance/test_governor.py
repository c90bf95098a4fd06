"""The Governor on its own (no HTTP), over an in-process ledger that can be cut off: what a
reservation its leases do not cover gets when the one sync succeeds, finds nothing left, or
fails."""

from __future__ import annotations

from typing import Any

import pytest

from meshd.config import build
from meshd.coordinator.gateway.config import Limits
from meshd.coordinator.gateway.governance.admission import Governor
from meshd.coordinator.gateway.governance.config import GovernanceConfig
from meshd.coordinator.gateway.http.api_request import ApiRequest, Endpoint
from meshd.coordinator.gateway.http.errors import ApiError
from meshd.coordinator.gateway.http.openai_api import parse_completion
from meshd.coordinator.ledger_actor import InProcessLedgerClient, LedgerUnavailable, LocalLedger
from meshd.scheduler.admission.ledger import SyncReply, SyncRequest


class CutOffLedger(InProcessLedgerClient):
    """A real in-process ledger whose link can be cut (`down`)."""

    down = False

    async def sync(self, req: SyncRequest) -> SyncReply:
        if self.down:
            raise LedgerUnavailable("ledger sync: link cut")
        return await super().sync(req)


def make_governor(fail_mode: str, **tenant: Any) -> tuple[Governor, CutOffLedger]:
    cfg = build(GovernanceConfig, {"tenants": {"acme": tenant},
                                   "ledger": {"fail_mode": fail_mode, "lease_fraction": 0.1},
                                   "loops": {"enabled": False}}, "gateway.governance.")
    ledger = CutOffLedger(LocalLedger())
    return Governor(cfg, ledger, "r0", 1 << 20), ledger


def make_request(max_tokens: int = 10) -> ApiRequest:
    obj = {"model": "m", "prompt": [1, 2, 3, 4, 5], "max_tokens": max_tokens}
    return ApiRequest(Endpoint.COMPLETIONS, "rid", parse_completion(obj, Limits()), obj, b"",
                      "acme", 0.0)


async def test_a_short_lease_syncs_once_then_reserves() -> None:
    gov, _ = make_governor("closed", tpm=1000)
    adm = await gov.admit(make_request(), [1, 2, 3, 4, 5])
    assert gov.keeper.syncs == 1  # the first reservation fetched the lease
    adm.finish(10, 0)
    for _ in range(5):  # 15 tokens each, out of a 100-token lease: no more syncs
        (await gov.admit(make_request(), [1, 2, 3, 4, 5])).finish(10, 0)
    assert gov.keeper.syncs == 1


async def test_nothing_left_is_a_429_and_an_unreachable_ledger_is_the_fail_mode() -> None:
    gov, _ = make_governor("closed", tpm=30)
    (await gov.admit(make_request(), [1, 2, 3, 4, 5])).finish(10, 0)
    (await gov.admit(make_request(), [1, 2, 3, 4, 5])).finish(10, 0)
    with pytest.raises(ApiError) as e:
        await gov.admit(make_request(), [1, 2, 3, 4, 5])
    assert e.value.status == 429 and e.value.code == "rate_limit_exceeded"
    gov2, ledger2 = make_governor("closed", tpm=1000)
    (await gov2.admit(make_request(), [1, 2, 3, 4, 5])).finish(10, 0)
    ledger2.down = True  # the leases are still valid, but the next needs more than they hold
    with pytest.raises(ApiError) as e:
        await gov2.admit(make_request(max_tokens=200), [1, 2, 3, 4, 5])
    assert e.value.status == 503 and e.value.code == "ledger_unavailable"
    assert gov2.outstanding == 0 and gov2.book.inflight() == 0


async def test_fail_open_serves_and_reports_when_the_ledger_is_back() -> None:
    gov, ledger = make_governor("open", tpm=1000)
    (await gov.admit(make_request(), [1, 2, 3, 4, 5])).finish(10, 0)
    ledger.down = True
    adm = await gov.admit(make_request(max_tokens=200), [1, 2, 3, 4, 5])
    assert gov.metrics.fail_open == 1
    adm.finish(50, 0)
    ledger.down = False
    assert await gov.keeper.sync()
    (meter,) = ledger.ledger.meters("tpm/acme/")
    assert meter["committed"] == 15 + 55  # both requests, reported once the link was back


async def test_admission_times_itself_on_a_sample_of_requests() -> None:
    gov, _ = make_governor("closed", tpm=100_000, rpm=10_000, max_concurrent=64)
    every = 16
    for _ in range(2 * every):  # the first waits for its lease: not sampled if it is picked
        (await gov.admit(make_request(), [1, 2, 3, 4, 5])).finish(10, 0)
    cost = gov.describe()["cost_us"]
    assert cost["every"] == every and cost["samples"] == 2
    # net of the clock's cost read in place (two samples of nothing): never below 0, and the
    # samples themselves read time
    assert cost["admit"] >= 0 and cost["settle"] >= 0
    assert (gov.admit_cpu.mean_us() or 0) > 0 and (gov.settle_cpu.mean_us() or 0) > 0
    assert gov.admit_cpu.nulls == gov.settle_cpu.nulls == 2
    assert cost["clock"]["admit"] >= 0 and cost["clock_floor"] > 0
