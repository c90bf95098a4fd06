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

from meshd.coordinator.gateway.governance.config import GovernanceConfig, Policy
from meshd.coordinator.gateway.governance.keeper import Keeper, UsageBuffer
from meshd.coordinator.gateway.governance.meters import USD, Bound, MeterSet
from meshd.coordinator.gateway.governance.metrics import CpuSample, GovernanceMetrics
from meshd.coordinator.gateway.governance.plan import TenantPlan
from meshd.coordinator.gateway.http.api_request import ApiRequest
from meshd.coordinator.gateway.http.errors import ApiError
from meshd.coordinator.ledger_actor import LedgerClient
from meshd.scheduler.admission.fair import FairQueue
from meshd.scheduler.admission.leases import LeaseBook, LeaseConfig, LocalMeter, PoolTicket
from meshd.scheduler.admission.loops import LoopBreaker, Verdict
from meshd.scheduler.admission.prices import CompletionEstimate, PriceTable

log = logging.getLogger("meshd.gateway.governance")
_NOTHING = (0, 0, 0, 0, 0)  # what a refused request used, on every meter


class Admitted:
    """One admitted request's reservation, fair-share slot and loop-breaker key."""

    __slots__ = ("_gov", "bound", "completion", "done", "fair_cost", "headers", "loop_key",
                 "max_tokens", "model", "n", "plan", "prompt", "source", "tenant", "ticket")

    def __init__(self, gov: Governor, plan: TenantPlan, model: str, prompt: int,
                 completion: int, n: int, source: str, loop_key: str,
                 max_tokens: int | None) -> None:
        self._gov, self.plan, self.tenant, self.model = gov, plan, plan.tenant, model
        self.prompt, self.completion, self.n, self.source = prompt, completion, n, source
        self.loop_key = loop_key
        self.max_tokens = max_tokens  # the policy's cap, sent when the client set none
        self.bound: Bound | None = None
        self.ticket: PoolTicket | None = None
        self.fair_cost = -1.0  # service charged to the fair queue; < 0: holds no slot
        self.headers = b""
        self.done = False

    def finish(self, completion: int, cached: int, output: Sequence[int] = ()) -> None:
        """Settle with what the request used (`completion` tokens over all choices, `cached`
        prompt tokens served from a prefix cache; `output`: the first choice's token ids, for
        the loop breaker). Idempotent."""
        self._gov.settle(self, completion, cached, output)


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
        self._loops_on, self._fair_on = config.loops.enabled, bool(config.fair.max_active)
        self.estimates = CompletionEstimate(config.estimate)
        self.metrics = GovernanceMetrics(self)
        self.outstanding = 0  # admitted, not yet settled
        # what admission costs this replica, timed in place on a sample of requests
        self.admit_cpu, self.settle_cpu = CpuSample(), CpuSample()
        self._day, self._day_until = "", 0.0  # the UTC day usage is booked on, until when
        self._plans: dict[str, TenantPlan] = {}  # tenant -> what admission reads of it
        self.apply(config.policy())

    def apply(self, policy: Policy) -> None:
        """Put `policy` in force (start-up and every reload); running requests keep theirs."""
        self.policy = policy
        self.prices = PriceTable(policy.prices)
        # labels only grow (a tenant dropped by a reload keeps its series: counters never
        # move between labels), bounded by the tenants the policies ever named
        self.metrics.known = frozenset({*self.metrics.known, *policy.tenants, *self.keyed,
                                        self.config.default_tenant})
        self._priced = self.prices.priced()
        self._fleet = MeterSet(self.book, None, None, policy.fleet, self._priced)
        self._drop_plans()

    def _drop_plans(self) -> None:
        for plan in self._plans.values():
            plan.bound.pool.retired = True  # its running requests settle on it
        self._plans = {}

    def _plan(self, tenant: str) -> TenantPlan:
        """The plan of a tenant that has none under the policy in force yet."""
        if len(self._plans) > 10_000:
            self._drop_plans()
        policy = self.policy.of(tenant)
        plan = self._plans[tenant] = TenantPlan(
            tenant, policy, MeterSet(self.book, tenant, policy, None, self._priced),
            self._fleet, self.max_tokens, self.config.loops.action, self.wall())
        return plan

    # ---- admission
    async def admit(self, req: ApiRequest, prompt_ids: Sequence[int] | None,
                    approx_prompt: int = 0) -> Admitted:
        """Admit `req` (its prompt's token ids, or None and an estimate of their number when
        the worker tokenizes) or raise ApiError saying which rule refused it."""
        t0 = self.admit_cpu.start()
        waited = False  # an admission that waited is not sampled (the wait is not its cost)
        tenant = req.tenant or self.config.default_tenant
        plan = self._plans.get(tenant) or self._plan(tenant)
        body = req.body
        model = body.model
        if plan.models and model not in plan.models:
            self._refused(tenant, model, "model_not_allowed")
            raise ApiError(403, f"Tenant {tenant!r} may not use the model {model!r}.",
                           err_type="permission_error", param="model", code="model_not_allowed")
        s = body.sampling
        max_tokens, n, cap = s.max_tokens, s.n, plan.cap
        if max_tokens is not None:
            if max_tokens > cap:
                self._refused(tenant, model, "max_tokens")
                raise ApiError(400, f"'max_tokens' ({max_tokens}) exceeds tenant {tenant!r}'s "
                               f"limit of {cap}.", param="max_tokens", code="max_tokens_exceeded")
            completion, source = max_tokens * n, "max_tokens"
        else:
            est, source = self.estimates.estimate(tenant, model, cap)
            completion = est * n
        prompt = len(prompt_ids) if prompt_ids is not None else approx_prompt
        # The common case runs without a suspension point: no await below unless the loop
        # breaker slows the request, the leases do not cover it, or it must queue.
        loop_key = ""
        now = self.clock()
        if prompt_ids is not None and self._loops_on:
            user = body.user
            loop_key = f"{tenant}/{user}" if user else tenant
            loops = self.loops
            verdict = loops.check(loop_key, loops.signature(prompt_ids), prompt, now)
            slow = 0.0 if verdict is None else self._on_loop(plan, model, loop_key, verdict)
            if slow:
                waited = True
                await asyncio.sleep(slow)
                plan = self._plans.get(tenant) or self._plan(tenant)  # a reload meanwhile
                now = self.clock()
        adm = Admitted(self, plan, model, prompt, completion, n, source, loop_key,
                       (plan.policy.max_tokens or None) if max_tokens is None else None)
        wall = self.wall()
        if wall >= plan.until:
            plan.rebind(self._fleet, wall)
        bound = plan.bound
        if bound.meters:
            head = plan.head_max if source == "max_tokens" else plan.head_est
            spend = self.prices.of(model).cost(prompt, 0, completion)
            use = (1, prompt, completion, spend, prompt + completion)  # units(...), inlined
            pool = bound.pool
            if not self.book.valid(now) or pool.reserve(use) is not None:
                waited = True  # the leases are past their deadline or do not cover it
                await self._reserve_slow(adm, bound, use, wall)
            adm.bound, adm.ticket = bound, pool.ticket(use)
            adm.headers = (head % bound.rate_values(wall) if source == "max_tokens" else
                           head % (source.encode(), completion, *bound.rate_values(wall)))
        self.outstanding += 1
        if self._fair_on:
            cost = self.fair.service(prompt, completion)
            if self.fair.try_enter(tenant, plan.priority, plan.weight, cost):
                adm.fair_cost = cost
            else:
                waited = True
                try:
                    await self._queue(adm, cost)
                except BaseException:
                    self.settle(adm, 0, 0, (), refused=True)
                    raise
        admissions = self.metrics.admissions  # metrics.admitted(tenant), inlined
        admissions[tenant] = admissions.get(tenant, 0) + 1
        if t0 and not waited:
            self.admit_cpu.stop(t0)
        return adm

    def _on_loop(self, plan: TenantPlan, model: str, key: str, verdict: Verdict) -> float:
        """A loop rule tripped: seconds to slow the request down (0: none); raises when the
        action is refuse."""
        loops = self.loops
        action = plan.loop_action
        self.metrics.loop(plan.tenant, verdict.rule, action)
        if verdict.count == loops.config.max_repeats:  # once per streak, not per request
            log.warning("loop breaker: %s tripped %s (%d in %.0fs), action %s", key,
                        verdict.rule, verdict.count, verdict.window_s, action)
        if action == "refuse":
            self._refused(plan.tenant, model, "loop_detected")
            what = ("near-identical prompts" if verdict.rule == "repeat_prompt"
                    else "identical completions to growing prompts")
            raise ApiError(429, f"Runaway loop detected for {key!r}: rule {verdict.rule} "
                           f"({verdict.count} {what} within {verdict.window_s:g}s). Change the "
                           f"prompt or wait.", err_type="rate_limit_error", code="loop_detected",
                           retry_after=verdict.window_s)
        return loops.config.slow_s if action == "slow" else 0.0

    async def _reserve_slow(self, adm: Admitted, bound: Bound, use: Sequence[int],
                            wall: float) -> None:
        """The leases are past their deadline or do not cover `use`: sync once (the one
        network round trip on a request's path), then reserve, refuse, or apply the fail mode."""
        short, reached = await self._take(bound, use)
        if short is None:
            return
        if reached:  # the ledger has nothing left for it
            raise self._refusal(adm, bound, use, short, wall)
        # the ledger is out of reach past the leases
        if self.config.ledger.fail_mode == "closed":
            self._refused(adm.tenant, adm.model, "ledger_unavailable")
            raise ApiError(503, "The usage ledger is unreachable, so this tenant's "
                           "limits cannot be checked; retry shortly.",
                           err_type="server_error", code="ledger_unavailable",
                           retry_after=1.0)
        bound.pool.force(use)
        self.metrics.fail_open += 1

    async def _take(self, bound: Bound, use: Sequence[int]) -> tuple[LocalMeter | None, bool]:
        """Reserve `use` on the leases, syncing once when they do not cover it. Returns (None,
        True) when reserved; else the meter short and whether the ledger answered (False: the
        leases are past their deadline or the one sync failed, so it is not known to be
        spent)."""
        book, pool, timeout = self.book, bound.pool, self.config.ledger.timeout_s
        if not book.valid(self.clock()):
            await self.keeper.urgent(timeout)
            if not book.valid(self.clock()):
                return bound.meters[0], False
            if pool.reserve(use) is None:
                return None, True
        reached = await self.keeper.urgent(timeout)  # ask for more
        if not book.valid(self.clock()):
            return bound.meters[0], False
        return pool.reserve(use), reached

    def _refusal(self, adm: Admitted, bound: Bound, use: Sequence[int], short: LocalMeter,
                 wall: float) -> ApiError:
        limit = bound.limit_of(short)
        need = use[limit.sel]
        self._refused(adm.tenant, adm.model, limit.name)
        retry = max(1.0, math.ceil(short.expires_at - wall)) if short.expires_at else 1.0
        who = "The mesh" if limit.name.startswith("fleet") else f"Tenant {adm.tenant!r}"
        if limit.name.endswith("_usd") or limit.name == "fleet_spend_per_hour":
            amount = (f"${short.limit / USD:.2f} (spent ${short.used / USD:.4f}; this request "
                      f"reserves up to ${need / USD:.6f})")
        else:
            amount = f"{short.limit} (used {short.used}; this request needs {need})"
        msg = f"{who} reached its {limit.name} limit of {amount}; retry after {retry:g}s."
        hdrs = self._rate_headers(bound, wall)
        if limit.quota:
            return ApiError(429, msg, err_type="insufficient_quota", code="insufficient_quota",
                            retry_after=retry, headers=hdrs)
        return ApiError(429, msg, err_type="rate_limit_error", code="rate_limit_exceeded",
                        retry_after=retry, headers=hdrs)

    def _refused(self, tenant: str, model: str, reason: str) -> None:
        self.metrics.refused(tenant, reason)
        self.usage.add(self._today(), tenant, model, 0, 0, 0, 0, 0, refused=1)

    @staticmethod
    def _rate_headers(bound: Bound, wall: float) -> tuple[tuple[str, str], ...]:
        """x-ratelimit-* of a refusal, as (name, value) pairs."""
        lines = (bound.rate_fmt % bound.rate_values(wall)).decode("latin-1").split("\r\n")
        return tuple((k, v) for k, _, v in (line.partition(": ") for line in lines if line))

    async def _queue(self, adm: Admitted, cost: float) -> None:
        """Wait in the tenant's fair-share queue for a slot (or 503 past the deadline)."""
        plan = adm.plan
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = self.fair.enqueue(adm.tenant, plan.priority, plan.weight, cost,
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
    def settle(self, adm: Admitted, completion: int, cached: int, output: Sequence[int],
               refused: bool = False) -> None:
        if adm.done:
            return
        t0 = self.settle_cpu.start()
        adm.done = True
        self.outstanding -= 1
        prompt = adm.prompt
        cost = self.prices.of(adm.model).cost(prompt, cached, completion)
        if adm.ticket is not None and adm.bound is not None:  # units(...), inlined
            adm.bound.pool.settle(adm.ticket, _NOTHING if refused else
                                  (1, prompt, completion, cost, prompt + completion))
        if adm.fair_cost >= 0:
            woken = self.fair.release(adm.tenant, self.fair.service(prompt, completion),
                                      adm.fair_cost)
            if woken:
                self._wake(woken)
        if not refused:  # book the usage
            self.usage.add(self._today(), adm.tenant, adm.model, 1, prompt, cached, completion,
                           cost)
            if adm.source != "max_tokens":
                self.estimates.observe(adm.tenant, adm.model, completion // adm.n)
            if output and adm.loop_key:
                loops = self.loops
                loops.observe(adm.loop_key, prompt, loops.signature(output))
        if t0:
            self.settle_cpu.stop(t0)

    def _wake(self, items: list[Any]) -> None:
        while items:
            fut, tenant, cost = items.pop()
            if fut.done():  # its waiter left: the slot it was given goes to the next one
                items.extend(self.fair.release(tenant, 0.0, cost))
            else:
                fut.set_result(None)

    def _today(self) -> str:
        wall = self.wall()
        if wall < self._day_until:
            return self._day
        t = time.gmtime(wall)
        self._day = f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"
        self._day_until = wall - wall % 86400 + 86400
        return self._day

    def describe(self) -> dict[str, Any]:
        """GET /debug/governance: this replica's view (`meshd status` prints it)."""
        tenants: dict[str, dict[str, int]] = {}
        for (t, outcome), v in self.metrics.outcomes.items():
            tenants.setdefault(t, {})[outcome] = v
        k = self.keeper
        return {"tenants": tenants, "outstanding": self.outstanding,
                # net of the clock's own cost as read in place (`clock`: in admit, in
                # settle; `clock_floor`: read hot)
                "cost_us": {"admit": self.admit_cpu.net_mean_us(),
                            "settle": self.settle_cpu.net_mean_us(),
                            "clock": {"admit": self.admit_cpu.clock_us(),
                                      "settle": self.settle_cpu.clock_us()},
                            "clock_floor": round(CpuSample.clock_ns() / 1000, 2),
                            "samples": self.admit_cpu.samples, "every": CpuSample.EVERY},
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
