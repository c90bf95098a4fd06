"""The admission stage: what a request must pass before it is routed, and what it owes after.

`Governor.admit(req, prompt_ids)` runs once per request, after the prompt is tokenized (its
length is exact) and before routing, identically on every replica:

1. the tenant is the API key's (or `default_tenant` without auth), never a client header; its
   policy may refuse the model (403) or a `max_tokens` past its cap (400);
2. the loop breaker looks at the prompt (log, slow down, or refuse 429 `loop_detected`);
3. the reservation: `prompt + estimated completion` tokens (`max_tokens` x n, else the running
   estimate) and their price, on every meter of the tenant and the fleet, from this replica's
   leases (`LeaseBook`); a reservation the leases do not cover waits for one ledger sync, then
   is refused 429 (`rate_limit_exceeded` or `insufficient_quota`, with Retry-After and
   `x-ratelimit-*`); with the ledger unreachable past the leases, 503 (fail closed) or served
   (fail open);
4. fair share: past `fair.max_active` running requests the request queues per tenant and is
   served by least attained service (`FairQueue`), or gets 503 when its queue deadline passes.

The returned `Admitted` is settled exactly once by `finish(...)` with what the request used —
on success, failure, client disconnect or cancellation alike — so a reservation never leaks.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from meshd.coordinator.gateway.governance.config import GovernanceConfig, Policy, TenantPolicy
from meshd.coordinator.gateway.governance.keeper import Keeper, UsageBuffer
from meshd.coordinator.gateway.governance.meters import (
    USD,
    Bound,
    MeterSet,
    actuals,
    parts,
    units,
)
from meshd.coordinator.gateway.governance.metrics import GovernanceMetrics
from meshd.coordinator.gateway.http.api_request import ApiRequest
from meshd.coordinator.gateway.http.errors import ApiError
from meshd.coordinator.ledger_actor import LedgerClient
from meshd.scheduler.admission.fair import FairQueue
from meshd.scheduler.admission.leases import LeaseBook, LeaseConfig, LocalMeter, Ticket
from meshd.scheduler.admission.loops import LoopBreaker
from meshd.scheduler.admission.prices import CompletionEstimate, PriceTable

log = logging.getLogger("meshd.gateway.governance")
_NO_HEADERS: tuple[tuple[str, str], ...] = ()


class Admitted:
    """One admitted request's reservation, fair-share slot and loop-breaker key."""

    __slots__ = ("_gov", "bound", "completion", "done", "fair_cost", "headers", "loop_key",
                 "max_tokens", "model", "n", "policy", "prompt", "source", "tenant", "ticket")

    def __init__(self, gov: Governor, tenant: str, policy: TenantPolicy, model: str,
                 prompt: int, completion: int, n: int, source: str) -> None:
        self._gov = gov
        self.tenant, self.policy, self.model = tenant, policy, model
        self.prompt, self.completion, self.n, self.source = prompt, completion, n, source
        self.bound: list[Bound] = []
        self.ticket: Ticket | None = None
        self.fair_cost = -1.0  # service charged to the fair queue; < 0: holds no slot
        self.loop_key = ""
        self.max_tokens: int | None = None  # the policy's cap, sent when the client set none
        self.headers = _NO_HEADERS
        self.done = False

    def finish(self, completion: int, cached: int, output_sig: int | None = None) -> None:
        """Settle with what the request used (`completion` tokens over all choices, `cached`
        prompt tokens served from a prefix cache). Idempotent."""
        self._gov.settle(self, completion, cached, output_sig)


class Governor:
    """Admission for one replica. Use from its event loop only."""

    def __init__(self, config: GovernanceConfig, client: LedgerClient, replica: str,
                 max_tokens: int, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, keyed: Iterable[str] = ()) -> None:
        """`keyed`: the tenants of `gateway.api_keys` (metric labels, like the policy's)."""
        self.config = config
        self.keyed = frozenset(keyed)
        self.max_tokens = max_tokens  # gateway.limits.max_tokens
        self.clock, self.wall = clock, wall
        lc = config.ledger
        self.book = LeaseBook(replica, LeaseConfig(lc.lease_fraction, lc.lease_ttl_s,
                                                   min(2.0, lc.lease_ttl_s / 4)))
        self.usage = UsageBuffer()
        self.keeper = Keeper(self.book, client, self.usage, lc.sync_interval_s, clock, wall)
        self.fair: FairQueue[tuple[asyncio.Future[None], str, float]] = FairQueue(
            config.fair, clock)
        self.loops = LoopBreaker(config.loops, clock)
        self.estimates = CompletionEstimate(config.estimate)
        self.metrics = GovernanceMetrics(self)
        self.outstanding = 0  # admitted, not yet settled
        self._day = ("", 0.0)
        self.apply(config.policy())

    def apply(self, policy: Policy) -> None:
        """Put `policy` in force (start-up and every reload); running requests keep theirs."""
        self.policy = policy
        self.prices = PriceTable(policy.prices)
        self.metrics.known = frozenset({*policy.tenants, *self.keyed,
                                        self.config.default_tenant})
        priced = self.prices.priced()
        self._fleet = MeterSet(self.book, None, None, policy.fleet, priced)
        self._sets: dict[str, MeterSet] = {}
        self._priced = priced

    def _meter_set(self, tenant: str, policy: TenantPolicy) -> MeterSet:
        ms = self._sets.get(tenant)
        if ms is None:
            if len(self._sets) > 10_000:
                self._sets.clear()
            ms = self._sets[tenant] = MeterSet(self.book, tenant, policy, None, self._priced)
        return ms

    # ---- admission
    async def admit(self, req: ApiRequest, prompt_ids: Sequence[int] | None,
                    approx_prompt: int = 0) -> Admitted:
        """Admit `req` (its prompt's token ids, or None and an estimate of their number when
        the worker tokenizes) or raise ApiError saying which rule refused it."""
        body = req.body
        tenant = req.tenant or self.config.default_tenant
        pol = self.policy.of(tenant)
        model = body.model
        if pol.models and model not in pol.models:
            self._refused(tenant, model, "model_not_allowed")
            raise ApiError(403, f"Tenant {tenant!r} may not use the model {model!r}.",
                           err_type="permission_error", param="model", code="model_not_allowed")
        s = body.sampling
        cap = pol.max_tokens or self.max_tokens
        if s.max_tokens is not None:
            if s.max_tokens > cap:
                self._refused(tenant, model, "max_tokens")
                raise ApiError(400, f"'max_tokens' ({s.max_tokens}) exceeds tenant {tenant!r}'s "
                               f"limit of {cap}.", param="max_tokens", code="max_tokens_exceeded")
            est, source = s.max_tokens, "max_tokens"
        else:
            est, source = self.estimates.estimate(tenant, model, cap)
        prompt = len(prompt_ids) if prompt_ids is not None else approx_prompt
        adm = Admitted(self, tenant, pol, model, prompt, est * s.n, s.n, source)
        if s.max_tokens is None and pol.max_tokens:
            adm.max_tokens = pol.max_tokens
        if self.loops.config.enabled and prompt_ids is not None:
            await self._check_loop(adm, req, prompt_ids)
        await self._reserve(adm)
        try:
            if self.config.fair.max_active:
                await self._enter(adm)
        except BaseException:
            self.settle(adm, 0, 0, None, refused=True)
            raise
        self.metrics.admitted(tenant)
        return adm

    async def _check_loop(self, adm: Admitted, req: ApiRequest, prompt_ids: Sequence[int]
                          ) -> None:
        user = req.body.user
        key = adm.loop_key = f"{adm.tenant}/{user}" if user else adm.tenant
        verdict = self.loops.check(key, self.loops.signature(prompt_ids), len(prompt_ids))
        if verdict is None:
            return
        action = adm.policy.loop_action or self.loops.config.action
        self.metrics.loop(adm.tenant, verdict.rule, action)
        if verdict.count == self.loops.config.max_repeats:  # once per streak, not per request
            log.warning("loop breaker: %s tripped %s (%d in %.0fs), action %s", key,
                        verdict.rule, verdict.count, verdict.window_s, action)
        if action == "slow":
            await asyncio.sleep(self.loops.config.slow_s)
        elif action == "refuse":
            self._refused(adm.tenant, adm.model, "loop_detected")
            what = ("near-identical prompts" if verdict.rule == "repeat_prompt"
                    else "identical completions to growing prompts")
            raise ApiError(429, f"Runaway loop detected for {key!r}: rule {verdict.rule} "
                           f"({verdict.count} {what} within {verdict.window_s:g}s). Change the "
                           f"prompt or wait.", err_type="rate_limit_error", code="loop_detected",
                           retry_after=verdict.window_s)

    async def _reserve(self, adm: Admitted) -> None:
        wall = self.wall()
        bound = self._meter_set(adm.tenant, adm.policy).refresh(wall)
        fleet = self._fleet.refresh(wall)
        if fleet:
            bound = bound + fleet
        if bound:
            use = units(adm.prompt, adm.completion,
                        self.prices.of(adm.model).cost(adm.prompt, 0, adm.completion))
            want = parts(bound, use)
            short, reached = await self._take(want)
            if short is not None and reached:  # the ledger has nothing left for it
                raise self._refusal(adm, bound, want, short, wall)
            if short is not None:  # the ledger is out of reach past the leases
                if self.config.ledger.fail_mode == "closed":
                    self._refused(adm.tenant, adm.model, "ledger_unavailable")
                    raise ApiError(503, "The usage ledger is unreachable, so this tenant's "
                                   "limits cannot be checked; retry shortly.",
                                   err_type="server_error", code="ledger_unavailable",
                                   retry_after=1.0)
                self.book.force(want)
                self.metrics.fail_open += 1
            adm.bound, adm.ticket = bound, self.book.ticket(want)
            estimate = (adm.source if adm.source == "max_tokens"
                        else f"{adm.source};tokens={adm.completion}")
            adm.headers = (*self._headers(bound, wall),
                           ("x-meshd-completion-estimate", estimate))
        self.outstanding += 1

    async def _take(self, want: list[tuple[LocalMeter, int]]) -> tuple[LocalMeter | None, bool]:
        """Reserve `want` on the leases, syncing once when they do not cover it. Returns (None,
        True) when reserved; else the meter short and whether the ledger answered (False: the
        leases are past their deadline or the one sync failed, so it is not known to be
        spent)."""
        book, timeout = self.book, self.config.ledger.timeout_s
        if not book.valid(self.clock()):
            await self.keeper.urgent(timeout)
        if not book.valid(self.clock()):
            return want[0][0], False
        short = book.reserve(want)
        if short is None:
            return None, True
        reached = await self.keeper.urgent(timeout)  # the one round trip: ask for more
        if not book.valid(self.clock()):
            return short, False
        return book.reserve(want), reached

    def _refusal(self, adm: Admitted, bound: list[Bound], want: list[tuple[LocalMeter, int]],
                 short: LocalMeter, wall: float) -> ApiError:
        limit = next(b.limit for b in bound if b.meter is short)
        need = next(units for m, units in want if m is short)
        self._refused(adm.tenant, adm.model, limit.name)
        retry = max(1.0, math.ceil(short.expires_at - wall)) if short.expires_at else 1.0
        who = "The mesh" if limit.name.startswith("fleet") else f"Tenant {adm.tenant!r}"
        if limit.name.endswith("_usd") or limit.name == "fleet_spend_per_hour":
            amount = (f"${short.limit / USD:.2f} (spent ${short.used / USD:.4f}; this request "
                      f"reserves up to ${need / USD:.6f})")
        else:
            amount = f"{short.limit} (used {short.used}; this request needs {need})"
        msg = f"{who} reached its {limit.name} limit of {amount}; retry after {retry:g}s."
        hdrs = self._headers(bound, wall)
        if limit.quota:
            return ApiError(429, msg, err_type="insufficient_quota", code="insufficient_quota",
                            retry_after=retry, headers=hdrs)
        return ApiError(429, msg, err_type="rate_limit_error", code="rate_limit_exceeded",
                        retry_after=retry, headers=hdrs)

    def _refused(self, tenant: str, model: str, reason: str) -> None:
        self.metrics.refused(tenant, reason)
        self.usage.add(self._today(), tenant, model, 0, 0, 0, 0, 0, refused=1)

    @staticmethod
    def _headers(bound: list[Bound], wall: float) -> tuple[tuple[str, str], ...]:
        """OpenAI's x-ratelimit-* for the tenant's rpm and tpm (none when it has neither)."""
        out: list[tuple[str, str]] = []
        for b in bound:
            name = b.limit.name
            if name != "rpm" and name != "tpm":
                continue
            kind = "requests" if name == "rpm" else "tokens"
            m = b.meter
            out += [(f"x-ratelimit-limit-{kind}", str(m.limit)),
                    (f"x-ratelimit-remaining-{kind}", str(m.remaining())),
                    (f"x-ratelimit-reset-{kind}",
                     f"{max(0, math.ceil(m.expires_at - wall))}s")]
        return tuple(out)

    async def _enter(self, adm: Admitted) -> None:
        pol = adm.policy
        cost = self.fair.service(adm.prompt, adm.completion)
        if self.fair.try_enter(adm.tenant, pol.priority_class, pol.weight, cost):
            adm.fair_cost = cost
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = self.fair.enqueue(adm.tenant, pol.priority_class, pol.weight, cost,
                                  (fut, adm.tenant, cost))
        if entry is None:
            self._refused(adm.tenant, adm.model, "queue_full")
            raise ApiError(503, "The mesh is saturated and the admission queue is full; retry "
                           "shortly.", err_type="server_error", code="overloaded",
                           retry_after=1.0)
        t0 = self.clock()
        try:  # asyncio.wait, not wait_for: it neither cancels `fut` nor swallows a cancel
            await asyncio.wait((fut,), timeout=self.config.fair.queue_timeout_s)
        except asyncio.CancelledError:  # the client left (or a deadline) while queued
            if not self.fair.cancel(entry):  # the slot was given to it already: pass it on
                self._wake(self.fair.release(adm.tenant, 0.0, cost))
            raise
        if not fut.done() and self.fair.cancel(entry):
            self._refused(adm.tenant, adm.model, "queue_timeout")
            raise ApiError(503, f"The mesh is saturated: the request waited "
                           f"{self.config.fair.queue_timeout_s:g}s in tenant {adm.tenant!r}'s "
                           f"fair-share queue without a slot; retry later.",
                           err_type="server_error", code="overloaded", retry_after=1.0)
        adm.fair_cost = cost
        self.metrics.queue_wait.observe(self.clock() - t0)

    # ---- settlement
    def settle(self, adm: Admitted, completion: int, cached: int, output_sig: int | None,
               refused: bool = False) -> None:
        if adm.done:
            return
        adm.done = True
        self.outstanding -= 1
        cost = self.prices.of(adm.model).cost(adm.prompt, cached, completion)
        if adm.ticket is not None:
            self.book.settle(adm.ticket, [0] * len(adm.bound) if refused else
                             actuals(adm.bound, units(adm.prompt, completion, cost)))
        if adm.fair_cost >= 0:
            self._wake(self.fair.release(adm.tenant, self.fair.service(adm.prompt, completion),
                                         adm.fair_cost))
        if refused:
            return
        self.usage.add(self._today(), adm.tenant, adm.model, 1, adm.prompt, cached,
                       completion, cost)
        self.metrics.used(adm.tenant, adm.prompt, cached, completion, cost)
        if adm.source != "max_tokens":
            self.estimates.observe(adm.tenant, adm.model, completion // adm.n)
        if output_sig is not None and adm.loop_key:
            self.loops.observe(adm.loop_key, adm.prompt, output_sig)

    def _wake(self, items: list[Any]) -> None:
        while items:
            fut, tenant, cost = items.pop()
            if fut.done():  # its waiter left: the slot it was given goes to the next one
                items.extend(self.fair.release(tenant, 0.0, cost))
            else:
                fut.set_result(None)

    def _today(self) -> str:
        day, until = self._day
        wall = self.wall()
        if wall >= until:
            t = time.gmtime(wall)
            day = f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"
            self._day = (day, wall - wall % 86400 + 86400)
        return day

    def describe(self) -> dict[str, Any]:
        """GET /debug/governance: this replica's view (`meshd status` prints it)."""
        tenants: dict[str, dict[str, int]] = {}
        for (t, outcome), v in self.metrics.outcomes.items():
            tenants.setdefault(t, {})[outcome] = v
        k = self.keeper
        return {"tenants": tenants, "outstanding": self.outstanding,
                "reserved_units": self.book.inflight(),
                "fair": {"max_active": self.config.fair.max_active, "active": self.fair.active,
                         "queued": self.fair.depth()},
                "ledger": {"replica": self.book.replica, "epoch": self.book.epoch,
                           "leases_valid": self.book.valid(self.clock()), "syncs": k.syncs,
                           "failures": k.failures, "last_error": k.last_error,
                           "meters": len(self.book.meters), "resets": self.book.resets,
                           "fail_mode": self.config.ledger.fail_mode},
                "policy": {"tenants": sorted(self.policy.tenants),
                           "default_tenant": self.config.default_tenant,
                           "priced_models": sorted(self.policy.prices)}}
