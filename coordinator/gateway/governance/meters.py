"""Which ledger meters a tenant's request touches, and how many units of each.

A request's reservation touches the tenant's limits (requests, tokens per minute,
concurrency, daily and monthly tokens and spend) and the fleet's (tokens per window, spend per
hour), each a `LocalMeter` of the replica's `LeaseBook` keyed by its window
(`rpm/acme/29634127`, `daily_budget_usd/acme/2026-12-02`). `bind(...)` gives them as one
`Bound` per tenant with what each meter counts; windows are wall time, the same on every
replica, and a `Bound` is cached until one of its windows turns over. Its meters are reserved
together through one `Pool` (`leases.py`), so a request costs the same however many limits
its tenant has.
"""

from __future__ import annotations

import calendar
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from meshd.coordinator.gateway.governance.config import FleetPolicy, TenantPolicy
from meshd.scheduler.admission.leases import LeaseBook, LocalMeter
from meshd.scheduler.admission.ledger import Kind

USD = 1_000_000_000  # nano-USD per USD


def units(prompt: int, completion: int, cost: int) -> tuple[int, int, int, int, int]:
    """What a request needs (reservation) or used (settlement), indexed by `Limit.sel`:
    (1 request, prompt tokens, completion tokens, nano-USD, prompt + completion tokens)."""
    return (1, prompt, completion, cost, prompt + completion)


REQUEST, PROMPT, COMPLETION, COST, TOKENS = range(5)


@dataclass(frozen=True, slots=True)
class Limit:
    """One meter a request touches: what it counts and how it refuses."""

    name: str  # rpm, tpm, ..., the rule named in a refusal
    kind: Kind
    quota: bool  # refused as insufficient_quota (a budget) rather than rate_limit_exceeded
    sel: int  # which of `units(...)` it counts


_LIMITS = {
    "rpm": Limit("rpm", Kind.COUNTER, False, REQUEST),
    "tpm": Limit("tpm", Kind.COUNTER, False, TOKENS),
    "input_tpm": Limit("input_tpm", Kind.COUNTER, False, PROMPT),
    "output_tpm": Limit("output_tpm", Kind.COUNTER, False, COMPLETION),
    "max_concurrent": Limit("max_concurrent", Kind.GAUGE, False, REQUEST),
    "daily_tokens": Limit("daily_tokens", Kind.COUNTER, True, TOKENS),
    "monthly_tokens": Limit("monthly_tokens", Kind.COUNTER, True, TOKENS),
    "daily_budget_usd": Limit("daily_budget_usd", Kind.COUNTER, True, COST),
    "monthly_budget_usd": Limit("monthly_budget_usd", Kind.COUNTER, True, COST),
    "fleet_tokens_per_s": Limit("fleet_tokens_per_s", Kind.COUNTER, False, TOKENS),
    "fleet_spend_per_hour": Limit("fleet_spend_per_hour", Kind.COUNTER, True, COST),
}


class Bound:
    """The meters a request of one tenant touches in the current windows (the tenant's, then
    the fleet's), reserved together through one `Pool`; `rate` are the rpm/tpm meters the
    x-ratelimit-* headers report (each with its pool slot), `rate_fmt` those headers' lines
    with their per-request values left as %d (`rate_fmt % rate_values(wall)`); valid while
    wall time < `until`."""

    __slots__ = ("_rate_end", "limits", "meters", "pool", "rate", "rate_fmt", "until")

    def __init__(self, book: LeaseBook, pairs: Sequence[tuple[Limit, LocalMeter]],
                 until: float) -> None:
        self.limits = tuple(limit for limit, _ in pairs)
        self.meters = tuple(m for _, m in pairs)
        self.pool = book.pool(self.meters, [limit.sel for limit in self.limits])
        rate = [(limit, m) for limit, m in pairs if limit.name in ("rpm", "tpm")]
        self.rate = tuple((m, self.pool.slot_of(m)) for _, m in rate)
        self.rate_fmt = b"".join(_rate_fmt(limit, m) for limit, m in rate)
        ends = {m.expires_at for _, m in rate}
        assert len(ends) <= 1, "rpm and tpm windows end together"
        self._rate_end = ends.pop() if ends else 0.0
        self.until = until

    def rate_values(self, wall: float) -> tuple[int, ...]:
        """Per rate meter, what is left and the seconds to its window's end: the best local
        estimate of what is left fleet-wide (this replica's lease and pool credit, and what
        the ledger had not granted at the last sync)."""
        credit, end = self.pool.credit, self._rate_end
        reset = math.ceil(end - wall) if end > wall else 0
        out: list[int] = []
        for m, slot in self.rate:
            left = m.held + credit[slot] + (m.free if m.free > 0 else 0)
            out.append(left if left > 0 else 0)
            out.append(reset)
        return tuple(out)

    def limit_of(self, meter: LocalMeter) -> Limit:
        return self.limits[self.meters.index(meter)]


def _rate_fmt(limit: Limit, m: LocalMeter) -> bytes:
    """The x-ratelimit-* header lines of an rpm or tpm meter: the limit whole (as of the
    bind), the remaining and reset values left as %d."""
    kind = "requests" if limit.name == "rpm" else "tokens"
    return (f"x-ratelimit-limit-{kind}: {m.limit}\r\nx-ratelimit-remaining-{kind}: %d\r\n"
            f"x-ratelimit-reset-{kind}: %ds\r\n").encode()


def _day_end(wall: float) -> tuple[str, float]:
    t = time.gmtime(wall)
    start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
    return f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}", float(start + 86400)


def _month_end(wall: float) -> tuple[str, float]:
    t = time.gmtime(wall)
    y, m = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}", float(calendar.timegm((y, m, 1, 0, 0, 0)))


class MeterSet:
    """The meters of one tenant (or of the fleet when `tenant` is None) for the current
    windows. `refresh(wall)` is cheap when no window turned over."""

    def __init__(self, book: LeaseBook, tenant: str | None, policy: TenantPolicy | None,
                 fleet: FleetPolicy | None, priced: bool) -> None:
        self.book, self.tenant = book, tenant
        self.specs: list[tuple[Limit, int, str, float]] = []  # limit, value, period, length
        if policy is not None:
            for name, period, scale in (("rpm", "m", 1), ("tpm", "m", 1),
                                        ("input_tpm", "m", 1), ("output_tpm", "m", 1),
                                        ("max_concurrent", "", 1), ("daily_tokens", "d", 1),
                                        ("monthly_tokens", "mo", 1),
                                        ("daily_budget_usd", "d", USD),
                                        ("monthly_budget_usd", "mo", USD)):
                value = getattr(policy, name)
                if value and (priced or scale == 1):
                    self.specs.append((_LIMITS[name], round(value * scale), period, 60.0))
        if fleet is not None:
            if fleet.tokens_per_s:
                self.specs.append((_LIMITS["fleet_tokens_per_s"],
                                   round(fleet.tokens_per_s * fleet.window_s), "w",
                                   fleet.window_s))
            if fleet.spend_per_hour_usd and priced:
                self.specs.append((_LIMITS["fleet_spend_per_hour"],
                                   round(fleet.spend_per_hour_usd * USD), "w", 3600.0))
        self.pairs: list[tuple[Limit, LocalMeter]] = []
        self.until = 0.0  # wall time the cached windows end

    def refresh(self, wall: float) -> list[tuple[Limit, LocalMeter]]:
        """(limit, meter) of the current windows; rebuilt only when a window turned over."""
        if wall < self.until:
            return self.pairs
        until = float("inf")
        pairs = []
        who = self.tenant if self.tenant is not None else "fleet"
        for limit, value, period, length in self.specs:
            if period == "":
                key, end = f"{limit.name}/{who}", 0.0
            elif period in ("m", "w"):
                idx = int(wall // length)
                key, end = f"{limit.name}/{who}/{idx}", (idx + 1) * length
            elif period == "d":
                day, end = _day_end(wall)
                key = f"{limit.name}/{who}/{day}"
            else:
                month, end = _month_end(wall)
                key = f"{limit.name}/{who}/{month}"
            if end:
                until = min(until, end)
            pairs.append((limit, self.book.meter(key, limit.kind, value, end)))
        self.pairs, self.until = pairs, until
        return pairs


def bind(tenant: MeterSet, fleet: MeterSet, wall: float) -> Bound:
    """The tenant's and the fleet's meters of the windows `wall` falls in."""
    pairs = tenant.refresh(wall) + fleet.refresh(wall)
    return Bound(tenant.book, pairs, min(tenant.until, fleet.until))
