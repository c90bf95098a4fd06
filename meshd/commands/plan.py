"""`meshd plan`: the P/D planner on the live mesh's last window, and (`--apply`) its role changes.

What it reads, on the coordinator host: the gateway replicas' request records of the last
`--window` seconds (every replica's file in the records dir: the whole fleet's arrivals, prompt
and output lengths, prefix-cache hits), the workers of `--model` and their roles (the
coordinator's node table, signed with its admin key), and the workers' calibrated step-time
figures (`GET /debug/workers` on the gateway: `cost`, what each replica measured from the
workers' `/metrics`), which become the simulator's timing. It prints every candidate split the
planner simulated and the one it picks for the SLO (`--ttft`, `--itl`), then the fewest role
changes that reach it; `--apply` makes them one worker at a time (`SetRole`: the worker is
drained, then restarted in its new role), each only once the one before is back in its new
role, so the mesh keeps all its other workers serving throughout. With `--interval S` it plans
window after window through the planner's hysteresis (a new split must win by `--min-gain`
for `--confirm-windows` windows in a row, and not within `--cooldown-windows` of the last
change), one line per window, applying what comes into force with `--apply`.

The calibration comes from the gateway at `--gateway` (default gateway.host:gateway.port);
when it cannot be read the plan says so and uses the simulator's default timing.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sqlite3
import time
from pathlib import Path

from meshd import capabilities as caps
from meshd.commands import CommandError, gateway_get, gateway_hostport
from meshd.config import MeshConfig
from meshd.coordinator.actors import ADMIN_KEY_FILE
from meshd.node_agent import identity
from meshd.node_agent.client import ControlClient, ControlError
from meshd.proto.v1 import control_pb2 as pb
from meshd.scheduler.planner import Plan, Planner, PlannerConfig, median_cost, timing_from_cost
from meshd.scheduler.role_moves import role_moves
from meshd.scheduler.sim.trace import TraceRequest
from meshd.scheduler.workload_stats import WorkloadStats

RECORDS_DIR = "records"  # under the coordinator's state dir (gateway/actor.py deploys it)
ROLE_CHANGE_TIMEOUT_S = 300.0  # a worker's drain and restart (the coordinator's ask expiry)
POLL_S = 0.5
CALIBRATION_ASKS = 4  # answers pooled per window (any replica may answer each)


def window_requests(records_dir: Path, model: str, since: float, until: float = math.inf
                    ) -> tuple[list[TraceRequest], float]:
    """The finished requests for `model` that started in [`since`, `until`], from every
    replica's record file (read-only), as a trace; and their prefix-cache hit ratio. `until`
    keeps out records dated after now (a replica whose clock runs ahead), which would crowd the
    window."""
    out: list[TraceRequest] = []
    prompt = cached = 0
    for path in sorted(records_dir.glob("gateway-*.db")):
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
        except sqlite3.Error:
            continue
        try:
            rows = db.execute("SELECT request_id, started_at, prompt_tokens, cached_tokens, "
                              "completion_tokens FROM records WHERE model = ? AND "
                              "started_at >= ? AND started_at <= ? AND outcome = 'ok'",
                              (model, since, until)).fetchall()
        except sqlite3.Error:  # a file being created: no table yet
            rows = []
        finally:
            db.close()
        for rid, t, p, c, o in rows:
            out.append(TraceRequest(str(rid), float(t), int(p), max(1, int(o))))
            prompt, cached = prompt + int(p), cached + int(c)
    out.sort(key=lambda r: r.arrival_s)
    return out, (min(cached / prompt, 0.99) if prompt else 0.0)


def workers_of(reply: pb.StatusReply, model: str) -> list[tuple[str, str, str]]:
    """(node id, worker id, role) of `model`'s workers on alive nodes, sorted."""
    return sorted((n.node_id, w.worker_id, caps.role_name(w.role) or "?")
                  for n in reply.nodes if n.state == "alive"
                  for w in n.workers if w.model == model)


def split_of(workers: list[tuple[str, str, str]]) -> tuple[int, int, int]:
    roles = [r for _, _, r in workers]
    return roles.count("prefill"), roles.count("decode"), roles.count("both")


def calibrated(host: str, port: int, model: str, asks: int = CALIBRATION_ASKS
               ) -> tuple[list[dict[str, float]], str]:
    """The measured cost figures for `model`'s workers (may be none), and why there are none
    when the gateway could not be read. The gateway's replicas share its port and each
    measures the workers itself, so it is asked `asks` times (each a new connection, which
    the kernel hands to any replica) and every answer's figures are kept: their median is
    then the fleet's, not one replica's (which made the plan swing from window to window)."""
    out: list[dict[str, float]] = []
    why = ""
    for _ in range(asks):
        reply = gateway_get(host, port, "/debug/workers", timeout_s=2.0)
        rows = reply.body.get("workers") if isinstance(reply.body, dict) else None
        if rows is None:
            why = f"gateway {reply.address}: {reply.why or 'no worker list'}"
            if reply.status == 0:
                break  # not there: asking again only waits
            continue
        out += [dict(r["cost"]) for r in rows
                if isinstance(r, dict) and r.get("model") == model and r.get("cost")]
    return out, "" if out else why


def table(plan: Plan, current: tuple[int, int, int]) -> str:
    rows = [f"{'split':<8}{'goodput':>10}{'in SLO':>8}{'TTFT p99':>10}{'ITL p99':>9}"
            f"{'SLO load':>10}"]
    for c in sorted(plan.candidates, key=lambda c: -c.goodput):
        mark = " <- plan" if c.split == plan.split else (" (now)" if c.split == current else "")
        rows.append(f"{c.label:<8}{c.goodput:>10.3g}{100 * c.attainment:>7.0f}%"
                    f"{c.ttft_p99_s:>9.2f}s{c.itl_p99_s * 1000:>7.0f}ms{c.slo_load:>10.2f}{mark}")
    return "\n".join(rows)


async def _status_or_ask(address: str, ident: identity.Identity, timeout_s: float,
                         change: tuple[str, str, str] | None = None) -> pb.StatusReply | str:
    """The coordinator's node table; with `change` (node, worker, role), ask for it: "" when
    asked, else the refusal."""
    client = ControlClient(address, ident, timeout_s)
    try:
        if change is None:
            return await client.status()
        node, worker, role = change
        try:
            await client.set_role(node, worker, caps.ROLES[role])
        except ControlError as e:
            return e.detail
        return ""
    finally:
        await client.close()


def change_state(reply: pb.StatusReply, model: str, node: str, worker: str, role: str,
                 before: tuple[int, int]) -> str:
    """Where one asked role change stands in the node table, given the node's (workers of
    `model`, of them in `role`) before the ask: "asked" (not taken yet, or the worker still
    draining or restarting), "done" (the old worker gone and the node back to as many
    workers, one more in `role`), "kept" (the old worker routed again in its old role: it
    did not drain in time, or its agent dropped the ask) or "gone" (its node is not alive).
    The agent takes the worker out of its report before it acknowledges the ask, so a worker
    listed with no ask pending is one that kept its role."""
    n = next((n for n in reply.nodes if n.node_id == node), None)
    if n is None or n.state != "alive":
        return "gone"
    if any(a.worker_id == worker for a in n.pending_roles):
        return "asked"
    mine = [w for w in n.workers if w.model == model]
    if any(w.worker_id == worker for w in mine):
        return "kept"
    in_role = sum(1 for w in mine if caps.role_name(w.role) == role)
    return "done" if len(mine) >= before[0] and in_role > before[1] else "asked"


def run(args: argparse.Namespace, cfg: MeshConfig) -> int:
    try:  # the planner's own checks of the SLO and the hysteresis, before anything is asked
        PlannerConfig(1, ttft_s=args.ttft, itl_s=args.itl, sample_requests=args.sample,
                      min_gain=args.min_gain, confirm_windows=args.confirm_windows,
                      cooldown_windows=args.cooldown_windows)
    except ValueError as e:
        raise CommandError(str(e)) from None
    try:
        ident = identity.load(f"{cfg.coordinator.state_dir}/{ADMIN_KEY_FILE}")
    except identity.IdentityError as e:
        raise CommandError(f"{e}; run `meshd plan` on the coordinator host") from None
    address = args.coordinator or f"{cfg.coordinator.grpc_host}:{cfg.coordinator.grpc_port}"
    model = args.model or cfg.workers.model_name
    records = Path(cfg.gateway.records.dir or
                   Path(cfg.coordinator.state_dir) / RECORDS_DIR).expanduser()
    ctx = _Context(args, cfg, ident, address, model, records)
    if args.interval is None:
        return ctx.once()
    rounds = 0
    try:
        while args.windows is None or rounds < args.windows:
            print(ctx.round(), flush=True)
            rounds += 1
            if args.windows is None or rounds < args.windows:
                time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    return 0


class _Context:
    """One planning session: `once` (a window, a decision, its table) or `round` after round
    through the planner's hysteresis (`--interval`), applying what it decides (`--apply`)."""

    def __init__(self, args: argparse.Namespace, cfg: MeshConfig, ident: identity.Identity,
                 address: str, model: str, records: Path) -> None:
        self.args, self.cfg, self.ident, self.address = args, cfg, ident, address
        self.model, self.records = model, records
        self.planner: Planner | None = None
        g = cfg.gateway
        self.gateway = gateway_hostport(args.gateway) if args.gateway else (g.host, g.port)
        self.calibrated_from, self.why_uncalibrated = 0, ""

    def _rpc(self, change: tuple[str, str, str] | None = None) -> pb.StatusReply | str:
        try:
            return asyncio.run(_status_or_ask(self.address, self.ident,
                                              self.cfg.agent.rpc_timeout_s, change))
        except ControlError as e:
            raise CommandError(f"coordinator {self.address}: {e.code.name}: {e.detail}"
                               ) from None

    def _status(self) -> pb.StatusReply:
        reply = self._rpc()
        assert not isinstance(reply, str)
        return reply

    def _inputs(self) -> tuple[list[tuple[str, str, str]], WorkloadStats, float, int, bool]:
        """(workers, window stats, prefix hits, requests, a role change under way)."""
        reply = self._status()
        workers = workers_of(reply, self.model)
        if not workers:
            raise CommandError(f"no alive workers serve the model {self.model!r}")
        busy = any(n.pending_roles for n in reply.nodes)
        window = self.args.window
        now = time.time()
        reqs, hits = window_requests(self.records, self.model, now - window, now)
        if len(reqs) < 2:
            raise CommandError(f"{len(reqs)} finished request(s) for {self.model!r} in the "
                               f"last {window:g}s in {self.records}: nothing to plan from")
        return workers, WorkloadStats.from_requests(reqs, window, hits), hits, len(reqs), busy

    def _planner(self, workers: list[tuple[str, str, str]]) -> Planner:
        """The session's planner, made again when the number of workers changed."""
        if self.planner is None or self.planner.config.total_workers != len(workers):
            a = self.args
            pcfg = PlannerConfig(len(workers), ttft_s=a.ttft, itl_s=a.itl,
                                 sample_requests=a.sample, min_gain=a.min_gain,
                                 confirm_windows=a.confirm_windows,
                                 cooldown_windows=a.cooldown_windows)
            self.planner = Planner(pcfg, deployed=split_of(workers))
        costs, self.why_uncalibrated = calibrated(*self.gateway, self.model)
        if costs:
            self.planner.set_timing(timing_from_cost(median_cost(costs),
                                                     self.planner.config.timing))
        self.calibrated_from = len(costs)
        return self.planner

    def _apply(self, workers: list[tuple[str, str, str]], moves: list[tuple[str, str]]
               ) -> list[str]:
        """Make `moves` one worker at a time, each once the one before is back in its new
        role (or has given up); stops at the first that does not complete."""
        node_of = {w: n for n, w, _ in workers}
        done: list[str] = []
        for worker, role in moves:
            node = node_of[worker]
            before = (sum(1 for n, _, _ in workers if n == node),
                      sum(1 for n, _, r in workers if n == node and r == role))
            refusal = self._rpc((node, worker, role))
            if refusal:
                done.append(f"{worker} -> {role} refused: {refusal}")
                break
            t0 = time.monotonic()
            state = "asked"
            while state == "asked" and time.monotonic() - t0 < ROLE_CHANGE_TIMEOUT_S:
                time.sleep(POLL_S)
                state = change_state(self._status(), self.model, node, worker, role, before)
            took = time.monotonic() - t0
            if state == "done":
                done.append(f"{worker} -> {role} in {took:.0f}s")
                continue
            why = {"kept": "it keeps its role (it did not drain in time, or its agent could "
                           "not change it: see the agent's log)",
                   "gone": "its node left",
                   "asked": f"not back within {ROLE_CHANGE_TIMEOUT_S:.0f}s"}[state]
            done.append(f"{worker} -> {role} failed: {why}")
            break
        return done

    def once(self) -> int:
        workers, stats, hits, n, _ = self._inputs()
        planner = self._planner(workers)
        plan = planner.plan(stats)
        current = split_of(workers)
        print(f"window: {n} requests over {self.args.window:g}s "
              f"({stats.arrival_rate_rps:.2f}/s, peak {stats.peak_rate_rps:.2f}/s), prefix "
              f"hits {100 * hits:.0f}%; timing: {self._timing_note()}")
        print(table(plan, current))
        moves = role_moves([(w, r) for _, w, r in workers], plan.split)
        if not moves:
            print(f"\nplan {plan.label} is what runs now: no change")
            return 0
        print(f"\nplan {plan.label} ({plan.reason}); changes: "
              + ", ".join(f"{w} -> {r}" for w, r in moves))
        if not self.args.apply:
            print("(--apply makes them one worker at a time, each drained first)")
            return 0
        done = self._apply(workers, moves)
        print("\n".join(done))
        return 0 if len(done) == len(moves) and all(" in " in d for d in done) else 1

    def round(self) -> str:
        """One window through the hysteresis; the line `--interval` prints for it."""
        stamp = time.strftime("%H:%M:%S")
        try:
            workers, stats, _, n, busy = self._inputs()
        except CommandError as e:
            return f"{stamp} skipped: {e}"
        current = split_of(workers)
        if busy:  # a change under way: its workers are out of the node table's count
            return f"{stamp} a role change is under way; waiting"
        planner = self._planner(workers)
        plan = planner.observe(stats)
        moves = role_moves([(w, r) for _, w, r in workers], plan.split)
        head = (f"{stamp} {n} requests ({stats.arrival_rate_rps:.2f}/s): running "
                f"{_label(current)}, in force {plan.label} ({plan.reason})")
        if not moves:
            return head
        if not self.args.apply:
            return head + "; would change " + ", ".join(f"{w} -> {r}" for w, r in moves)
        return head + "; " + "; ".join(self._apply(workers, moves))

    def _timing_note(self) -> str:
        if self.calibrated_from:
            return (f"calibrated from the workers' step times ({self.calibrated_from} figures "
                    f"from the gateway's replicas)")
        if self.why_uncalibrated:
            return f"the default model ({self.why_uncalibrated})"
        return "the default model (no worker measured yet)"


def _label(split: tuple[int, int, int]) -> str:
    from meshd.scheduler.planner import split_label

    return split_label(split)
