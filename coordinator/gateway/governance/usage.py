"""`GET /v1/meshd/usage`: spend and tokens per tenant and model, fleet-wide, from the ledger.

An admin tenant (policy `admin = true`, or anyone when the gateway has no API keys) sees every
tenant and may pass `?tenant=NAME`; any other tenant sees its own usage only. `since` / `until`
are UTC dates (YYYY-MM-DD, inclusive; default: this month so far). Before asking the ledger the
replica syncs, so what it served a moment ago is included. Each row's `cached_savings_usd` is
what its cached prompt tokens would have cost at the uncached input price: what prefix-aware
routing saved the tenant. `limits` shows, per tenant asked about, the budgets and rate limits
of the current windows with what is used of them fleet-wide.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from meshd.coordinator.gateway.http.errors import ApiError, invalid

if TYPE_CHECKING:
    from meshd.coordinator.gateway.governance.admission import Governor

_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_WINDOWS = {"rpm": 60.0, "tpm": 60.0, "input_tpm": 60.0, "output_tpm": 60.0,
            "fleet_spend_per_hour": 3600.0}


def _query(path: str) -> dict[str, str]:
    q = path.split("?", 1)[1] if "?" in path else ""
    out = {}
    for k, v in parse_qs(q, keep_blank_values=True).items():
        if k not in ("tenant", "since", "until"):
            raise invalid(f"Unknown query parameter {k!r} (valid: tenant, since, until).", k)
        out[k] = v[-1]
    for k in ("since", "until"):
        if k in out and not _DAY.fullmatch(out[k]):
            raise invalid(f"'{k}' must be a UTC date YYYY-MM-DD, got {out[k]!r}.", k)
    return out


async def usage_report(gov: Governor, caller: str | None, path: str) -> dict[str, Any]:
    """The report for `caller` (the API key's tenant; None without auth)."""
    q = _query(path)
    tenant = caller or gov.config.default_tenant
    admin = caller is None or gov.policy.of(tenant).admin
    want = q.get("tenant") or None
    if not admin:
        if want is not None and want != tenant:
            raise ApiError(403, f"Tenant {tenant!r} may read its own usage only.",
                           err_type="permission_error", param="tenant",
                           code="permission_denied")
        want = tenant
    today = time.strftime("%Y-%m-%d", time.gmtime(gov.wall()))
    since, until = q.get("since", today[:8] + "01"), q.get("until", today)
    await gov.keeper.urgent(gov.config.ledger.timeout_s)
    try:
        rows = await gov.keeper.client.usage(want, since, until)
        meters = await gov.keeper.client.meters("")
    except Exception as e:
        raise ApiError(503, f"The usage ledger is unreachable: {e}", err_type="server_error",
                       code="ledger_unavailable", retry_after=1.0) from None
    data = []
    for r in rows:
        price = gov.prices.of(r["model"])
        data.append({**{k: r[k] for k in ("day", "tenant", "model", "requests",
                                          "prompt_tokens", "cached_tokens",
                                          "completion_tokens", "refused")},
                     "spend_usd": r["spend_nusd"] / 1e9,
                     "cached_savings_usd": r["cached_tokens"]
                     * (price.input - price.cached_input) / 1e6})
    return {"object": "meshd.usage", "tenant": want, "since": since, "until": until,
            "data": data, "totals": _totals(data),
            "limits": _limits(meters, want, admin, gov.policy.fleet.window_s)}


def _totals(data: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for row in data:
        t = out.setdefault(row["tenant"], {"requests": 0, "prompt_tokens": 0,
                                           "cached_tokens": 0, "completion_tokens": 0,
                                           "refused": 0, "spend_usd": 0.0,
                                           "cached_savings_usd": 0.0})
        for k in t:
            t[k] += row[k]
    return out


def _window(limit: str, rest: list[str], fleet_window_s: float) -> str | None:
    """A meter's window as people read it: a day or month as is, a minute or a fleet window
    as its start in UTC (the key holds its index)."""
    if not rest:
        return None
    length = _WINDOWS.get(limit) or (fleet_window_s if limit == "fleet_tokens_per_s" else 0)
    if not length or not rest[0].isdigit():
        return rest[0]
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(rest[0]) * length))


def _limits(meters: list[dict[str, Any]], tenant: str | None, admin: bool,
            fleet_window_s: float) -> dict[str, list[dict[str, Any]]]:
    """Current-window meters by owner (a tenant, and "fleet" for an admin), as the ledger
    accounts them."""
    out: dict[str, list[dict[str, Any]]] = {}
    owners = {tenant, "fleet"} if admin else {tenant}
    for m in meters:
        parts = m["key"].split("/")
        if len(parts) < 2 or (tenant is not None and parts[1] not in owners) or (
                parts[1] == "fleet" and not admin):
            continue
        usd = parts[0].endswith("_usd") or parts[0] == "fleet_spend_per_hour"
        scale = 1e9 if usd else 1
        out.setdefault(parts[1], []).append({
            "limit": parts[0], "window": _window(parts[0], parts[2:], fleet_window_s),
            "max": m["limit"] / scale, "used": m["committed"] / scale,
            "reserved": m["outstanding"] / scale, "unit": "usd" if usd else (
                "requests" if parts[0] in ("rpm", "max_concurrent") else "tokens")})
    return out
