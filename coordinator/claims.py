"""What a node may claim in its capability report, judged at registration (pure).

A report names workers the gateways will send users' prompts to, so a node may claim only:
- worker ids no other node has claimed (kept while the owner is down, given up when it leaves
  cleanly, so an id cannot be taken over while its owner is away);
- listeners (`host:port` of a worker's HTTP, KV-event, replay and KV-transfer endpoints) no
  other live node reports;
- listeners on its own address: the address the coordinator sees it connect from, or the host
  the operator pinned for its key (`meshd trust add KEY --host H`, for a node behind NAT or
  reporting a DNS name). A node connecting over loopback may use any loopback address.

`check(...)` raises `Refused` with a reason and a detail naming the worker and field.

Attributes (`check_attributes`): a node's `privacy` class, and any attribute the operator pinned
for its key (`meshd trust add KEY --attr K=V`), must be exactly what the operator pinned: a
node cannot claim itself into a class that privacy-aware routing trusts with sensitive prompts.
"""

from __future__ import annotations

from collections.abc import Iterable

from meshd import endpoints
from meshd.capabilities import Capabilities, listeners
from meshd.coordinator.nodes import DEAD, LEFT, Node

# Attributes a report may carry only as the operator pinned them (others: once pinned)
GUARDED = frozenset({"privacy"})


class Refused(Exception):
    """`reason`: worker_id_taken | endpoint_taken | not_own_address | attribute_not_pinned."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string (`ipv4:10.0.0.5:41234`, `ipv6:[::1]:41234`,
    `unix:...`); "" when it has none (a unix socket: local)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return ""


def check(node_id: str, report: Capabilities, seen_from: str, pinned_host: str,
          others: Iterable[Node]) -> None:
    """Raise Refused when `report` (from `node_id`, connecting from host `seen_from`, with
    the operator's `pinned_host` or "") claims what is not its own."""
    own = {endpoints.normal_host(h) for h in (seen_from, pinned_host) if h}
    local = not seen_from or endpoints.is_loopback(seen_from)
    ids: dict[str, str] = {}
    taken: dict[tuple[str, int], tuple[str, str]] = {}
    for n in others:
        if n.node_id == node_id or n.state == LEFT:  # a node that left gave its claims up
            continue
        for w in n.capabilities.workers:
            ids[w.worker_id] = n.node_id
            if n.state != DEAD:  # a port of a dead node may be bound again by another
                for _, addr in listeners(w):
                    taken[addr] = (n.node_id, w.worker_id)
    for w in report.workers:
        owner = ids.get(w.worker_id)
        if owner is not None:
            raise Refused("worker_id_taken", f"worker id {w.worker_id!r} belongs to node "
                          f"{owner}")
        for field, (host, port) in listeners(w):
            holder = taken.get((host, port))
            if holder is not None:
                raise Refused("endpoint_taken", f"worker {w.worker_id!r} {field} {host}:{port} "
                              f"is node {holder[0]}'s (worker {holder[1]!r})")
            if host in own or (local and endpoints.is_loopback(host)):
                continue
            where = f"this node connects from {seen_from}" if seen_from else "this node is local"
            pin = f", its pinned host is {pinned_host}" if pinned_host else (
                "; pin another host with `meshd trust add KEY --host HOST`")
            raise Refused("not_own_address", f"worker {w.worker_id!r} {field} is on {host}, "
                          f"not on this node's address ({where}{pin})")


def check_attributes(attributes: dict[str, str], pinned: dict[str, str]) -> None:
    """Raise Refused when a guarded attribute (`GUARDED`, or one pinned for the key) differs
    from its pin, or is claimed without one."""
    for key in sorted(GUARDED | set(pinned)):
        claimed, pin = attributes.get(key), pinned.get(key)
        if claimed is None or claimed == pin:
            continue
        allowed = (f"its key is pinned to {key}={pin}" if pin is not None else
                   f"no {key} is pinned for its key")
        raise Refused("attribute_not_pinned", f"the report claims {key}={claimed}, but {allowed}"
                      f"; the operator pins it with `meshd trust add KEY --attr {key}=VALUE`")
