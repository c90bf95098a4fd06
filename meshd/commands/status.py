"""`meshd status`: the coordinator's node table, fetched with a signed admin request, then what
the gateway on `cfg.gateway` reports (2 s timeout each): its routing set (`GET /debug/workers`),
cache-routing health (`GET /debug/cache-health`), tenant admission (`GET /debug/governance`)
and its request records of the last 24 h (`GET /debug/requests?rollups=1`).
A gateway that does not answer is one line per section, never an error."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from google.protobuf.json_format import MessageToDict

from meshd.commands import CommandError, gateway_get
from meshd.config import MeshConfig
from meshd.coordinator.actors import ADMIN_KEY_FILE
from meshd.node_agent import identity
from meshd.node_agent.client import ControlClient, ControlError
from meshd.proto.v1 import control_pb2 as pb
from meshd.scheduler.privacy import node_class

ROLE = {pb.WORKER_ROLE_PREFILL: "P", pb.WORKER_ROLE_DECODE: "D", pb.WORKER_ROLE_BOTH: "PD"}


async def fetch(address: str, ident: identity.Identity, timeout_s: float = 5.0
                ) -> pb.StatusReply:
    client = ControlClient(address, ident, timeout_s)
    try:
        return await client.status()
    finally:
        await client.close()


def table(reply: pb.StatusReply) -> str:
    rows = [f"{'NODE':<20} {'HOST':<22} {'GPUS':<16} {'STATE':<8} {'CLASS':<11} "
            f"{'LAST HB':<9} WORKERS"]
    for n in reply.nodes:
        gpus = f"{n.gpu_count}x {n.gpu_names[0]}" if n.gpu_count else "cpu"
        workers = ", ".join(f"{w.worker_id}({ROLE.get(w.role, '?')})" for w in n.workers) or "-"
        cls = node_class(n.attributes)  # its privacy class (privacy-aware routing)
        rows.append(f"{n.node_id:<20} {n.host[:22]:<22} {gpus[:16]:<16} {n.state:<8} "
                    f"{cls[:11]:<11} {n.heartbeat_age_s:>6.1f}s  {workers}")
    if not reply.nodes:
        rows.append("(no nodes registered)")
    return "\n".join(rows)


def fetch_gateway(host: str, port: int, path: str, timeout_s: float = 2.0,
                  holds: tuple[str, type] = ("workers", list)
                  ) -> tuple[str, dict[str, Any] | None, str]:
    """(gateway address, its JSON answer to GET `path` or None, why not); the answer must
    hold `holds` (a key and the type of its value). Never raises for a down gateway."""
    reply = gateway_get(host, port, path, timeout_s=timeout_s)
    if reply.why:
        return reply.address, None, reply.why
    key, kind = holds
    if not isinstance(reply.body, dict) or not isinstance(reply.body.get(key), kind):
        return reply.address, None, "unexpected answer"
    return reply.address, reply.body, ""


def fetch_cache_health(host: str, port: int, timeout_s: float = 2.0
                       ) -> tuple[str, dict[str, Any] | None, str]:
    return fetch_gateway(host, port, "/debug/cache-health", timeout_s)


def routing_section(address: str, report: dict[str, Any] | None, why: str) -> str:
    """The gateway's routing set: a worker the mesh path does not route to says why."""
    if report is None:
        return f"routing set: gateway {address} unreachable ({why})"
    workers = report["workers"]
    width = max([len("WORKER"), *(len(str(w.get("worker_id"))) for w in workers)])
    rows = [f"routing set (gateway {address}):",
            f"  {'WORKER':<{width}} {'MODEL':<16} {'ROLE':<7} {'HEALTH':<8} {'QUEUED':>7}  "
            "PROTOCOL"]
    for w in workers:
        health = "ok" if w.get("healthy") and not w.get("backoff_s") else (
            "backoff" if w.get("healthy") else "down")
        proto = str(w.get("protocol"))
        if proto != "mesh":
            proto += f" ({w.get('protocol_detail')})"
        rows.append(f"  {w.get('worker_id')!s:<{width}} {str(w.get('model'))[:16]:<16} "
                    f"{w.get('role')!s:<7} {health:<8} {w.get('queued_prefill_tokens', 0):>7}  "
                    f"{proto}")
    if not workers:
        rows.append("  (no workers)")
    return "\n".join(rows)


def cache_section(address: str, report: dict[str, Any] | None, why: str) -> str:
    if report is None:
        return f"cache routing: gateway {address} unreachable ({why})"
    workers = report["workers"]
    verdict = "ok" if report.get("ok") else "ISSUES: " + ", ".join(
        f"{code} x{n}" for code, n in sorted((report.get("issues") or {}).items()))
    width = max([len("WORKER"), *(len(str(w.get("worker_id"))) for w in workers)])
    rows = [f"cache routing (gateway {address}): {verdict}",
            f"  {'WORKER':<{width}} {'EVENTS':>7} {'LAST EVENT':>11}  ISSUES"]
    for w in workers:
        age = w.get("last_event_age_s")
        last = "never" if age is None else f"{age:.1f}s ago"
        issues = ", ".join(w.get("issues") or ()) or "-"
        rows.append(f"  {w.get('worker_id')!s:<{width}} {w.get('batches_seen', 0):>7} "
                    f"{last:>11}  {issues}")
    if not workers:
        rows.append("  (no workers)")
    return "\n".join(rows)


def fetch_governance(host: str, port: int, timeout_s: float = 2.0
                     ) -> tuple[str, dict[str, Any] | None, str]:
    return fetch_gateway(host, port, "/debug/governance", timeout_s, ("tenants", dict))


def governance_section(address: str, report: dict[str, Any] | None, why: str) -> str:
    """The gateway replica's admission: per tenant what it admitted and refused (by the rule
    that refused), reservations not yet settled, the fair-share queue, its ledger link, what
    admission costs it."""
    if report is None:
        return f"governance: gateway {address} unreachable ({why})"
    tenants: dict[str, dict[str, int]] = report["tenants"]
    width = max([len("TENANT"), *(len(t) for t in tenants)])
    rows = [f"governance (gateway {address}):",
            f"  {'TENANT':<{width}} {'ADMITTED':>8}  REFUSED"]
    for t, outcomes in sorted(tenants.items()):
        refused = ", ".join(f"{reason} x{n}" for reason, n in sorted(outcomes.items())
                            if reason != "admitted") or "-"
        rows.append(f"  {t:<{width}} {outcomes.get('admitted', 0):>8}  {refused}")
    if not tenants:
        rows.append("  (no requests yet)")
    rows.append(f"  reservations outstanding: {report.get('outstanding', 0)} "
                f"({report.get('reserved_units', 0)} units)")
    fair = report.get("fair") or {}
    if fair.get("max_active"):
        rows.append(f"  fair queue: {fair.get('active', 0)}/{fair['max_active']} active, "
                    f"{fair.get('queued', 0)} queued")
    else:
        rows.append("  fair queue: off (fair.max_active = 0)")
    led = report.get("ledger") or {}
    rows.append(f"  ledger: epoch {led.get('epoch')}, leases "
                f"{'valid' if led.get('leases_valid') else 'EXPIRED'}, syncs {led.get('syncs')}"
                f", failures {led.get('failures')}, last error: {led.get('last_error') or '-'}"
                f" (fail {led.get('fail_mode')})")
    cost = report.get("cost_us") or {}
    if cost.get("samples"):
        rows.append(f"  admission cost: {cost['admit']} us + settlement {cost['settle']} us of "
                    f"CPU per request ({cost['samples']} sampled)")
    return "\n".join(rows)


def fetch_requests(host: str, port: int, timeout_s: float = 2.0
                   ) -> tuple[str, dict[str, Any] | None, str]:
    return fetch_gateway(host, port, "/debug/requests?rollups=1", timeout_s, ("rollups", list))


def requests_section(address: str, report: dict[str, Any] | None, why: str) -> str:
    """The gateway replica's request records over the last 24 h, per tenant and model (its
    hourly rollups): requests, errors, tokens, TTFT mean and max."""
    if report is None:
        if why.startswith("HTTP"):  # it answered: no records kept there, say its reason
            return f"requests: gateway {address}: {why}"
        return f"requests: gateway {address} unreachable ({why})"
    acc: dict[tuple[str, str], dict[str, float]] = {}
    for h in report["rollups"]:
        a = acc.setdefault((h.get("tenant") or "-", h.get("model") or "-"), dict.fromkeys(
            ("requests", "errors", "prompt_tokens", "completion_tokens", "ttft_count",
             "ttft_sum_s", "ttft_max_s"), 0.0))
        for k in ("requests", "errors", "prompt_tokens", "completion_tokens", "ttft_count",
                  "ttft_sum_s"):
            a[k] += h.get(k) or 0
        a["ttft_max_s"] = max(a["ttft_max_s"], h.get("ttft_max_s") or 0.0)
    rows = [f"requests (gateway {address}, last 24 h, this replica):"]
    if not acc:
        rows.append("  (no requests recorded)")
        return "\n".join(rows)
    tw = max(len("TENANT"), *(len(t) for t, _ in acc))
    mw = max(len("MODEL"), *(len(m) for _, m in acc))
    rows.append(f"  {'TENANT':<{tw}} {'MODEL':<{mw}} {'REQUESTS':>8} {'ERRORS':>6} "
                f"{'PROMPT':>8} {'COMPLETION':>10} {'TTFT MEAN':>10} {'TTFT MAX':>9}")
    for (t, m), a in sorted(acc.items()):
        mean = f"{a['ttft_sum_s'] / a['ttft_count'] * 1000:.0f} ms" if a["ttft_count"] else "-"
        peak = f"{a['ttft_max_s'] * 1000:.0f} ms" if a["ttft_count"] else "-"
        rows.append(f"  {t:<{tw}} {m:<{mw}} {int(a['requests']):>8} {int(a['errors']):>6} "
                    f"{int(a['prompt_tokens']):>8} {int(a['completion_tokens']):>10} "
                    f"{mean:>10} {peak:>9}")
    return "\n".join(rows)


def _section(address: str, report: dict[str, Any] | None, why: str) -> dict[str, Any]:
    """A gateway section for `--json`."""
    return {"gateway": address, "reachable": report is not None,
            **({"error": why} if report is None else report)}


def run(args: argparse.Namespace, cfg: MeshConfig) -> int:
    try:
        ident = identity.load(f"{cfg.coordinator.state_dir}/{ADMIN_KEY_FILE}")
    except identity.IdentityError as e:
        raise CommandError(f"{e}; run `meshd status` on the coordinator host "
                           "(or point --state-dir at its state dir)") from None
    address = args.coordinator or f"{cfg.coordinator.grpc_host}:{cfg.coordinator.grpc_port}"
    try:
        reply = asyncio.run(fetch(address, ident, cfg.agent.rpc_timeout_s))
    except ControlError as e:
        raise CommandError(f"coordinator {address}: {e.code.name}: {e.detail}") from None
    gw, health, why = fetch_cache_health(cfg.gateway.host, cfg.gateway.port)
    _, routing, rwhy = fetch_gateway(cfg.gateway.host, cfg.gateway.port, "/debug/workers")
    _, gov, gwhy = fetch_governance(cfg.gateway.host, cfg.gateway.port)
    _, recs, qwhy = fetch_requests(cfg.gateway.host, cfg.gateway.port)
    if args.json:
        out = MessageToDict(reply, preserving_proto_field_name=True)
        out["cache_routing"] = _section(gw, health, why)
        out["routing_set"] = _section(gw, routing, rwhy)
        out["governance"] = _section(gw, gov, gwhy)
        out["requests"] = _section(gw, recs, qwhy)
        print(json.dumps(out, indent=2))
    else:
        print(f"coordinator {address}, up {time.time() - reply.coordinator_started_unix:.0f}s")
        print(table(reply))
        for section in (routing_section(gw, routing, rwhy), cache_section(gw, health, why),
                        governance_section(gw, gov, gwhy), requests_section(gw, recs, qwhy)):
            print()
            print(section)
    return 0
