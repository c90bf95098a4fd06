"""`meshd usage`: tenants' requests, tokens and spend per model over a range of UTC days, then
their current limits, from the gateway's `GET /v1/meshd/usage` on `cfg.gateway`.

Any replica answers for the whole fleet (it reads the ledger). The API key is `--api-key`, else
`MESHD_API_KEY`: an admin tenant's key sees every tenant (or the one `--tenant` names), any other
key its own tenant only. `--json` prints the gateway's answer unchanged. Every failure (gateway
down, key refused, bad date) is a `CommandError` saying what to do.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlencode

from meshd import env
from meshd.commands import CommandError, GatewayReply, gateway_get
from meshd.config import MeshConfig

PATH = "/v1/meshd/usage"
TIMEOUT_S = 10.0  # the gateway syncs with the ledger, then reads it, before it answers
COUNTERS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "spend_usd",
            "cached_savings_usd", "refused")
HEADER = ("TENANT", "MODEL", "REQUESTS", "PROMPT", "CACHED", "COMPLETION", "SPEND $", "SAVED $",
          "REFUSED")
LIMITS_HEADER = ("OWNER", "LIMIT", "WINDOW", "USED/MAX", "RESERVED", "UNIT")
TOTAL = "(total)"


def query(tenant: str | None, since: str | None, until: str | None) -> str:
    """The request path: only the filters given (the gateway defaults the rest)."""
    q = {k: v for k, v in (("tenant", tenant), ("since", since), ("until", until)) if v}
    return f"{PATH}?{urlencode(q)}" if q else PATH


def fetch(cfg: MeshConfig, path: str, api_key: str | None) -> tuple[str, dict[str, Any]]:
    """(gateway address, its usage report); raises CommandError saying why there is none."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    reply = gateway_get(cfg.gateway.host, cfg.gateway.port, path, headers, TIMEOUT_S)
    ok = not reply.why and isinstance(reply.body, dict)
    if ok and reply.body.get("object") == "meshd.usage":
        return reply.address, reply.body
    raise CommandError(_failure(reply, api_key is not None))


def _failure(reply: GatewayReply, had_key: bool) -> str:
    where = f"gateway {reply.address}"
    if reply.status == 0:
        return (f"{where} is unreachable ({reply.why}); start it, or point gateway.host and "
                f"gateway.port ({env.var_name('gateway', 'host')}, "
                f"{env.var_name('gateway', 'port')}) at it")
    if reply.status == 401:
        what = "refused the API key" if had_key else "needs an API key"
        return f"{where} {what} (HTTP 401); pass --api-key or set {env.API_KEY_VAR}"
    if reply.status == 404:
        return f"{where} has no usage endpoint ({reply.why}); is it a meshd gateway?"
    if reply.why:
        return f"{where}: {reply.why}"
    return f"{where}: unexpected answer to GET {PATH} (not a meshd.usage report)"


def by_model(data: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    """The report's per-day rows summed per (tenant, model) over the range."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for row in data:
        acc = out.setdefault((str(row.get("tenant")), str(row.get("model"))),
                             dict.fromkeys(COUNTERS, 0))
        for k in COUNTERS:
            acc[k] += row.get(k) or 0
    return out


def _cells(tenant: str, model: str, c: dict[str, Any]) -> list[str]:
    return [tenant, model, *(f"{c.get(k) or 0:.6f}" if k.endswith("_usd") else
                             str(int(c.get(k) or 0)) for k in COUNTERS)]


def grid(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list[str]:
    """Rows of columns as wide as their widest cell, indented by two; `align` has one `<`
    (left) or `>` (right: numbers) per column."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) if a == "<" else c.rjust(w)
                             for c, w, a in zip(r, widths, align, strict=True)).rstrip()
            for r in (header, *rows)]


def usage_table(address: str, report: dict[str, Any]) -> str:
    """Rows per tenant and model over the range, each tenant's closed by its totals line."""
    models = by_model(report.get("data") or ())
    totals: dict[str, dict[str, Any]] = report.get("totals") or {}
    rows: list[list[str]] = []
    for tenant in sorted({t for t, _ in models} | set(totals)):
        rows += [_cells(t, model, c) for (t, model), c in sorted(models.items()) if t == tenant]
        rows.append(_cells(tenant, TOTAL, totals.get(tenant) or {}))
    who = "all tenants" if report.get("tenant") is None else f"tenant {report['tenant']}"
    head = f"usage {report.get('since')} .. {report.get('until')}, {who} (gateway {address}):"
    if not rows:
        return f"{head}\n  (no usage in this range)"
    return "\n".join([head, *grid(HEADER, rows, "<<" + ">" * len(COUNTERS))])


def _amount(v: Any, unit: str) -> str:
    x = float(v or 0)
    if unit == "usd":
        return f"{x:.6f}".rstrip("0").rstrip(".") or "0"
    return str(int(x)) if x.is_integer() else f"{x:g}"


def limits_table(limits: dict[str, list[dict[str, Any]]]) -> str:
    """The current windows' limits by owner (tenants, then the fleet), with what is used of
    them fleet-wide and what replicas hold reserved."""
    rows = []
    for owner in sorted(limits, key=lambda o: (o == "fleet", o)):
        for m in sorted(limits[owner], key=lambda m: str(m.get("limit"))):
            unit = str(m.get("unit"))
            rows.append([owner, str(m.get("limit")), str(m.get("window") or "-"),
                         f"{_amount(m.get('used'), unit)}/{_amount(m.get('max'), unit)}",
                         _amount(m.get("reserved"), unit), unit])
    if not rows:
        return "limits: none set"
    return "\n".join(["limits (current windows):", *grid(LIMITS_HEADER, rows, "<<<>><")])


def run(args: argparse.Namespace, cfg: MeshConfig) -> int:
    path = query(args.tenant, args.since, args.until)
    address, report = fetch(cfg, path, args.api_key or env.api_key())
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(usage_table(address, report))
    print()
    print(limits_table(report.get("limits") or {}))
    return 0
