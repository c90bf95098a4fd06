"""`meshd trust add|list|revoke|token|revoke-token`: edit the coordinator's trust store directly.

File-system access to the coordinator's state dir is the operator credential; the running
registry reads keys from the same SQLite file on every request, so changes apply at once.
A token from `token --uses N` enrolls up to N keys (the pods of a KubeRay worker group, the
hosts of a `ray up` cluster); `revoke-token ID [--keys]` stops it, and its keys with `--keys`.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

from meshd import endpoints
from meshd.commands import CommandError
from meshd.config import MeshConfig
from meshd.coordinator.store import Store
from meshd.node_agent.identity import node_id_for


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _attrs(pairs: list[str]) -> dict[str, str]:
    """`--attr K=V` flags as a dict; CommandError naming a bad one."""
    out: dict[str, str] = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        k, v = k.strip(), v.strip()
        if not sep or not re.fullmatch(r"[a-z0-9_]{1,32}", k) or not \
                re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", v):
            raise CommandError(f"--attr {pair!r}: expected KEY=VALUE (key 1-32 of a-z 0-9 _, "
                               "value 1-64 of A-Z a-z 0-9 _ . : -)")
        out[k] = v
    return out


def run(args: argparse.Namespace, cfg: MeshConfig) -> int:
    store = Store(cfg.coordinator.state_dir)
    try:
        if args.action == "add":
            try:
                key = bytes.fromhex(args.public_key)
            except ValueError:
                raise CommandError("public key must be hex (see `meshd identity show`)") from None
            host = args.host.strip()
            if host:
                try:
                    endpoints.parse(f"http://{host}:1")
                except ValueError:
                    raise CommandError(f"--host {args.host!r} is not an IP address or a host "
                                       "name") from None
            attrs = _attrs(args.attr)
            before = store.key(key)
            if before is not None and before.state == "revoked":
                print(f"warning: {before.node_id} was revoked at {_when(before.revoked_at)}; "
                      "adding it trusts it again", file=sys.stderr)
            try:
                rec = store.add_key(key, node_id_for(key), args.label,
                                    "admin" if args.admin else "agent",
                                    pinned_host=endpoints.normal_host(host) if host else "",
                                    pinned_attrs=attrs)
            except ValueError as e:
                raise CommandError(str(e)) from None
            pin = f", workers may listen on {rec.pinned_host}" if rec.pinned_host else ""
            if attrs:
                pin += ", may claim " + " ".join(f"{k}={v}" for k, v in sorted(attrs.items()))
            print(f"trusted {rec.node_id} ({rec.role}{pin})")
        elif args.action == "revoke":
            try:
                rec = store.revoke_key(args.key)
            except KeyError as e:
                raise CommandError(str(e.args[0])) from None
            print(f"revoked {rec.node_id}")
        elif args.action == "token":
            ttl = args.ttl if args.ttl is not None else cfg.coordinator.join_token_ttl_s
            if ttl <= 0:
                raise CommandError(f"--ttl must be > 0, got {ttl}")
            try:
                print(store.create_token(ttl, args.label, args.uses))
            except ValueError as e:
                raise CommandError(f"--uses: {e}") from None
        elif args.action == "revoke-token":
            _revoke_token(store, args.token_id, args.keys)
        else:
            print(f"{'NODE ID':<20} {'ROLE':<6} {'STATE':<8} {'SOURCE':<18} {'ADDED':<19} "
                  f"{'HOST':<16} {'ATTRIBUTES':<20} LABEL")
            for k in store.list_keys():
                shown = ",".join(f"{a}={v}" for a, v in sorted(k.attributes.items())) or "-"
                print(f"{k.node_id:<20} {k.role:<6} {k.state:<8} {k.source:<18} "
                      f"{_when(k.added_at):<19} {k.pinned_host or '-':<16} {shown:<20} "
                      f"{k.label}")
            tokens = store.tokens()
            if tokens:
                now = time.time()
                print(f"\n{'TOKEN ID':<14} {'STATE':<8} {'USES':<11} {'EXPIRES':<19} "
                      f"{'LAST USED':<19} LABEL")
                for t in tokens:
                    print(f"{t.token_id:<14} {t.state(now):<8} {f'{t.uses}/{t.max_uses}':<11} "
                          f"{_when(t.expires_at):<19} {_when(t.used_at):<19} {t.label}")
    finally:
        store.close()
    return 0


def _revoke_token(store: Store, token_id: str, keys: bool) -> None:
    """Stop a token's later enrollments; with `keys`, revoke the keys it enrolled too."""
    try:
        tok = store.revoke_token(token_id)
    except KeyError as e:
        raise CommandError(str(e.args[0])) from None
    enrolled = store.enrolled_by(tok.token_id)
    print(f"revoked token {tok.token_id} ({tok.uses} of {tok.max_uses} uses taken)")
    for k in enrolled:
        if keys and k.state == "trusted":
            k = store.revoke_key(k.node_id)
        print(f"  {'revoked' if k.state == 'revoked' else 'still trusted'}: {k.node_id} "
              f"(enrolled {_when(k.added_at)})")
    if enrolled and not keys:
        print("the keys it enrolled stay trusted; add --keys to revoke them as well")
