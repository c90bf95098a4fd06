"""The `meshd` command line. Each subcommand lives in `meshd/commands/`; this module only parses.

Settings come from one TOML file (`--config` or `MESHD_CONFIG`), `MESHD_<SECTION>_<FIELD>`
environment variables and the flags below, in rising precedence (see `meshd.config`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from meshd import __version__, env
from meshd.config import ConfigError, MeshConfig, load


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshd", description="meshd: distributed mesh inference")
    p.add_argument("--version", action="version", version=f"meshd {__version__}")
    p.add_argument("--config", help="TOML config file (default: $MESHD_CONFIG)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start a local mesh serving the OpenAI API on one machine")
    _coord_flags(up)
    up.add_argument("--prefill", type=int, help="embedded prefill workers (default 1)")
    up.add_argument("--decode", type=int, help="embedded decode workers (default 1)")
    up.add_argument("--port", type=int, help="OpenAI API port (default 8000)")
    up.add_argument("--duration", type=float, default=0.0,
                    help="stop after this many seconds (0: until Ctrl-C)")

    coord = sub.add_parser("coordinator", help="start or stop the coordinator on Ray")
    csub = coord.add_subparsers(dest="action", required=True, metavar="ACTION")
    start = csub.add_parser("start", help="start or join a Ray head and deploy the actors")
    _coord_flags(start)
    start.add_argument("--ray-address", help="join this Ray cluster instead of starting a head")
    start.add_argument("--ray-port", type=int, default=6379, help="port of a new Ray head")
    stop = csub.add_parser("stop", help="stop the coordinator actors")
    stop.add_argument("--ray-address", default="auto", help="Ray cluster to stop it on")
    stop.add_argument("--stop-ray", action="store_true", help="also stop the local Ray head")

    agent = sub.add_parser("agent", help="run the node agent daemon")
    agent.add_argument("--coordinator", help="coordinator address host:port")
    agent.add_argument("--state-dir", help="agent state directory (holds node.key)")
    agent.add_argument("--join-token", help="one-time token from `meshd trust token`")
    agent.add_argument("--host", help="address peers use to reach this host")
    agent.add_argument("--attr", action="append", default=[], metavar="K=V",
                       help="attribute to report (zone=a, privacy=high); repeatable")

    status = sub.add_parser("status", help="table of nodes as the coordinator sees them")
    status.add_argument("--coordinator", help="coordinator address host:port")
    status.add_argument("--state-dir", help="coordinator state dir (holds admin.key)")
    status.add_argument("--json", action="store_true", help="print JSON")

    role = sub.add_parser("role", help="change a worker's role at runtime (drained first)")
    rsub_role = role.add_subparsers(dest="role_command", required=True)
    rset = rsub_role.add_parser("set", help="ask NODE's agent to re-role WORKER to ROLE")
    rset.add_argument("node", help="node id (`meshd status`)")
    rset.add_argument("worker", help="worker id (`meshd status`)")
    rset.add_argument("role", choices=("prefill", "decode", "both"))
    rset.add_argument("--coordinator", help="coordinator address host:port")
    rset.add_argument("--state-dir", help="coordinator state dir (holds admin.key)")
    targets = sub.add_parser(
        "targets", help="write the mesh's Prometheus scrape targets (file_sd JSON)",
        description="Write the workers of the registry's alive and suspect nodes and the "
        "gateway replicas' own metrics ports to a Prometheus file_sd file, replaced atomically "
        "when it changes. Run on the coordinator host (it signs with admin.key).")
    targets.add_argument("--out", required=True, metavar="FILE",
                         help="the file_sd JSON file cluster/prometheus/prometheus.yml reads")
    targets.add_argument("--interval", type=float, metavar="S",
                         help="rewrite every S seconds until stopped (default: once)")
    targets.add_argument("--coordinator", help="coordinator address host:port")
    targets.add_argument("--state-dir", help="coordinator state dir (holds admin.key)")
    targets.add_argument("--gateway", metavar="HOST:PORT",
                         help="the gateway's OpenAI port, asked for its replicas (default: "
                              "gateway.host:gateway.port; a host Prometheus reaches)")
    targets.add_argument("--no-gateway", action="store_true",
                         help="workers only (a mesh without gateway replicas)")

    plan = sub.add_parser("plan", help="the P/D planner on the mesh's last window "
                                       "(--apply: re-role workers)")
    plan.add_argument("--model", help="the model whose workers to plan (default: [workers])")
    plan.add_argument("--window", type=float, default=300.0, metavar="S",
                      help="seconds of request records to plan from (default 300)")
    plan.add_argument("--ttft", type=float, default=2.0, metavar="S",
                      help="TTFT SLO (default 2)")
    plan.add_argument("--itl", type=float, default=0.1, metavar="S",
                      help="mean inter-token gap SLO (default 0.1)")
    plan.add_argument("--sample", type=int, default=300, metavar="N",
                      help="synthetic requests each candidate is simulated on (default 300)")
    plan.add_argument("--apply", action="store_true", help="ask for the role changes")
    plan.add_argument("--interval", type=float, metavar="S",
                      help="plan every S seconds through the hysteresis until stopped")
    plan.add_argument("--windows", type=int, metavar="N",
                      help="with --interval: stop after N windows")
    plan.add_argument("--min-gain", type=float, default=0.10, metavar="F",
                      help="with --interval: how much more goodput (relative) a new split must "
                           "predict than the one in force (default 0.10)")
    plan.add_argument("--confirm-windows", type=int, default=3, metavar="N",
                      help="with --interval: windows in a row a new split must win (default 3)")
    plan.add_argument("--cooldown-windows", type=int, default=5, metavar="N",
                      help="with --interval: windows after a change that cannot confirm "
                           "another (default 5)")
    plan.add_argument("--gateway", metavar="HOST:PORT",
                      help="the gateway whose worker calibration to plan with (default: "
                           "gateway.host:gateway.port)")
    plan.add_argument("--coordinator", help="coordinator address host:port")
    plan.add_argument("--state-dir", help="coordinator state dir (holds admin.key)")
    usage = sub.add_parser("usage", help="tenants' tokens, spend and limits, from the gateway",
                           description="Requests, tokens and spend per tenant and model over a "
                           "range of UTC days, and the current limits, from the gateway at "
                           "gateway.host:gateway.port. An admin tenant's key sees every tenant, "
                           "any other key its own.")
    usage.add_argument("--tenant", help="only this tenant (another tenant's needs an admin key)")
    usage.add_argument("--since", metavar="YYYY-MM-DD",
                       help="first UTC day (default: the 1st of this month)")
    usage.add_argument("--until", metavar="YYYY-MM-DD",
                       help="last UTC day, inclusive (default: today)")
    usage.add_argument("--api-key", metavar="KEY",
                       help=f"the gateway API key (default: ${env.API_KEY_VAR})")
    usage.add_argument("--json", action="store_true", help="print the gateway's JSON as it is")

    receipt = sub.add_parser("receipt", help="signed inference receipts")
    rsub = receipt.add_subparsers(dest="action", required=True, metavar="ACTION")
    ver = rsub.add_parser("verify", help="check a saved response's receipt offline",
                          description="Check a receipt against the mesh's published keys: the "
                          "gateway's signature, the nodes' attestations (not revoked), the "
                          "token counts, and the response text. Exit 0 verified, 1 not.")
    ver.add_argument("file", help="a response body, an SSE capture of a stream, or a receipt")
    ver.add_argument("--keys", metavar="FILE",
                     help="a saved GET /v1/meshd/keys (default: ask the gateway)")
    ver.add_argument("--api-key", metavar="KEY",
                     help=f"the gateway API key (default: ${env.API_KEY_VAR})")
    ver.add_argument("--allow-unattested", action="store_true",
                     help="accept segments no node signed (vLLM workers, a cut-off stream)")
    ver.add_argument("--json", action="store_true", help="print the result as JSON")

    ident = sub.add_parser("identity", help="this host's node identity")
    isub = ident.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = isub.add_parser("show", help="print node id and public key (creates the key)")
    show.add_argument("--state-dir", help="agent state directory")

    engine = sub.add_parser("engine", help="the embedded CPU engine")
    esub = engine.add_subparsers(dest="action", required=True, metavar="ACTION")
    from meshd.node_agent.engine.worker_config import add_serve_flags

    add_serve_flags(esub.add_parser("serve", help="serve the OpenAI API and KV transfer"))

    trust = sub.add_parser("trust", help="the coordinator's trust store")
    trust.add_argument("--state-dir", help="coordinator state directory")
    tsub = trust.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = tsub.add_parser("add", help="trust a public key (hex, from `meshd identity show`)")
    add.add_argument("public_key")
    add.add_argument("--label", default="")
    add.add_argument("--admin", action="store_true", help="may call admin RPCs (status)")
    add.add_argument("--host", default="",
                     help="a host its workers may listen on besides the address it connects "
                          "from (behind NAT, or a DNS name in its report)")
    add.add_argument("--attr", action="append", default=[], metavar="K=V",
                     help="an attribute its reports may claim, e.g. privacy=restricted "
                          "(repeatable); a report claiming another value is refused")
    tsub.add_parser("list", help="list keys and join tokens")
    rev = tsub.add_parser("revoke", help="revoke a key by node id or public key")
    rev.add_argument("key")
    tok = tsub.add_parser("token", help="create a join token (one-time unless --uses)")
    tok.add_argument("--ttl", type=float, help="seconds until it expires")
    tok.add_argument("--label", default="")
    tok.add_argument("--uses", type=int, default=1, metavar="N",
                     help="keys it may enroll before it is used up (default 1: one-time; "
                          "N for the pods of a worker group or a launcher's hosts)")
    rtok = tsub.add_parser("revoke-token", help="refuse a join token's later enrollments")
    rtok.add_argument("token_id", help="the token's id (`meshd trust list`) or the token")
    rtok.add_argument("--keys", action="store_true",
                      help="also revoke every key the token enrolled")
    return p


def _coord_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", help="coordinator state directory")
    p.add_argument("--grpc-port", type=int, help="control-plane gRPC port")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (0: pick a free one)")


def overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Flags that set config fields, by section."""
    out: dict[str, dict[str, Any]] = {"coordinator": {}, "agent": {}}
    cmd = args.command
    section = "agent" if cmd in ("agent", "identity") else "coordinator"
    if getattr(args, "state_dir", None):
        out[section]["state_dir"] = args.state_dir
    for flag in ("grpc_port", "metrics_port"):
        if getattr(args, flag, None) is not None:
            out["coordinator"][flag] = getattr(args, flag)
    if cmd == "up" and args.port is not None:
        out["gateway"] = {"port": args.port}
    if cmd in ("agent", "status", "role", "plan") and args.coordinator:
        out["agent"]["coordinator"] = args.coordinator
    if cmd == "agent":
        if args.join_token:
            out["agent"]["join_token"] = args.join_token
        if args.host:
            out["agent"]["host"] = args.host
        if args.attr:
            out["agent"]["attributes"] = ",".join(args.attr)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    env.grpc_defaults()
    args = _parser().parse_args(argv)
    quiet = args.command == "up"  # `up` prints its own progress; -v shows the component logs
    logging.basicConfig(level=logging.DEBUG if args.verbose else (
                            logging.WARNING if quiet else logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg: MeshConfig = load(args.config, overrides(args))
    except ConfigError as e:
        print(f"meshd: config error: {e}", file=sys.stderr)
        return 2
    from meshd import commands

    try:
        return commands.run(args, cfg)
    except KeyboardInterrupt:
        return 130
    except commands.CommandError as e:
        print(f"meshd: {e}", file=sys.stderr)
        return 1
