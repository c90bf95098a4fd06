"""A node may claim only its own workers (issue 12, "worker endpoints bound to the node that
reports them"): each refusal through the real control plane over gRPC, and the pure rules."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from support.control import control_server, make_config, make_report
from support.net import free_port

from meshd import capabilities as caps
from meshd.capabilities import Worker
from meshd.coordinator import claims
from meshd.coordinator.nodes import ALIVE, DEAD, LEFT, Node
from meshd.envelope import seal
from meshd.node_agent.client import ControlClient, ControlError
from meshd.node_agent.identity import Identity
from meshd.proto.v1 import control_pb2 as pb


def worker(wid: str, port: int, host: str = "127.0.0.1", events: int = 0) -> Worker:
    return Worker(wid, f"http://{host}:{port}", "decode", "tiny",
                  kv_events_endpoint=f"tcp://{host}:{events}" if events else "")


async def register(address: str, ident: Identity, *workers: Worker) -> pb.RegisterReply:
    return await register_report(address, ident, make_report("h", workers))


async def register_report(address: str, ident: Identity, report: caps.Capabilities
                          ) -> pb.RegisterReply:
    payload = pb.RegisterRequest(capabilities=caps.to_pb(report))
    client = ControlClient(address, ident)
    try:
        raw = seal(ident, "Register", payload.SerializeToString()).SerializeToString()
        reply: pb.RegisterReply = await client.call_raw("Register", raw)
        return reply
    finally:
        await client.close()


async def refused(address: str, ident: Identity, code: grpc.StatusCode, reason: str,
                  *workers: Worker) -> str:
    with pytest.raises(ControlError) as e:
        await register(address, ident, *workers)
    assert (e.value.code, e.value.reason) == (code, reason), e.value
    return e.value.detail


async def test_a_node_cannot_claim_another_nodes_worker_id_or_listener(tmp_path: Path) -> None:
    async with control_server(make_config(tmp_path)) as run:
        a, b = Identity.generate(), Identity.generate()
        for ident in (a, b):
            run.store.add_key(ident.public_key, ident.node_id)
        http, events = free_port(), free_port()
        await register(run.address, a, worker(f"{a.node_id}-d1", http, events=events))
        detail = await refused(run.address, b, grpc.StatusCode.ALREADY_EXISTS,
                               "worker_id_taken", worker(f"{a.node_id}-d1", free_port()))
        assert a.node_id in detail
        detail = await refused(run.address, b, grpc.StatusCode.ALREADY_EXISTS, "endpoint_taken",
                               worker(f"{b.node_id}-d1", http))
        assert f"127.0.0.1:{http}" in detail and a.node_id in detail
        await refused(run.address, b, grpc.StatusCode.ALREADY_EXISTS, "endpoint_taken",
                      worker(f"{b.node_id}-d1", free_port(), events=events))
        assert b.node_id not in run.server.plane.table.nodes  # nothing of it was taken in
        await register(run.address, b, worker(f"{b.node_id}-d1", free_port()))  # its own: fine
        await register(run.address, a, worker(f"{a.node_id}-d1", http, events=events))  # again
        routed = {m.worker.worker_id: m.node_id for m in run.server.plane.routable_workers()}
        assert routed == {f"{a.node_id}-d1": a.node_id, f"{b.node_id}-d1": b.node_id}


async def test_workers_listen_on_the_nodes_own_address_or_its_pinned_host(
        tmp_path: Path) -> None:
    async with control_server(make_config(tmp_path)) as run:
        node = Identity.generate()
        run.store.add_key(node.public_key, node.node_id)
        elsewhere = worker(f"{node.node_id}-d1", 8000, host="10.9.9.9")
        detail = await refused(run.address, node, grpc.StatusCode.PERMISSION_DENIED,
                               "not_own_address", elsewhere)
        assert "10.9.9.9" in detail and "meshd trust add" in detail
        await register(run.address, node, worker(f"{node.node_id}-d1", free_port(),
                                                 host="127.0.0.2"))  # any loopback: local
        run.store.add_key(node.public_key, node.node_id, pinned_host="10.9.9.9")
        await register(run.address, node, elsewhere)  # the operator pinned it
        assert run.store.key(node.public_key).pinned_host == "10.9.9.9"


@pytest.mark.parametrize(("bad", "field"), [
    (Worker("w", "not-a-url", "decode", "m"), "endpoint"),
    (Worker("w", "http://127.0.0.1:0", "decode", "m"), "endpoint"),
    (Worker("w", "https://127.0.0.1:80", "decode", "m"), "endpoint"),
    (Worker("w", "http://127.0.0.1:80", "decode", "m", kv_events_endpoint="127.0.0.1:5"),
     "kv_events_endpoint"),
    (Worker("w x", "http://127.0.0.1:80", "decode", "m"), "worker_id"),
    (Worker("w", "http://127.0.0.1:80", "decode", "m", api_token="short"), "api_token"),
    (Worker("w", "http://127.0.0.1:80", "decode", "m",
            api_token="0123456789abcdef\r\nx-injected: 1"), "api_token"),
    (Worker("w", "http://127.0.0.1:80", "decode", "m", api_token="0123456789 abcdef"),
     "api_token"),
])
async def test_a_malformed_worker_is_refused_naming_the_field(tmp_path: Path, bad: Worker,
                                                              field: str) -> None:
    async with control_server(make_config(tmp_path)) as run:
        node = Identity.generate()
        run.store.add_key(node.public_key, node.node_id)
        detail = await refused(run.address, node, grpc.StatusCode.INVALID_ARGUMENT,
                               "bad_capabilities", bad)
        assert f"capabilities.workers[0].{field}" in detail


async def test_a_workers_token_reaches_the_gateways_only(tmp_path: Path) -> None:
    """Issue 12 §5: the token a node reports with its workers is in the routing set the
    gateways read (so they can call the workers), never in the admin's status answer nor in a
    refusal's detail."""
    token = "tok-" + "7" * 40
    async with control_server(make_config(tmp_path)) as run:
        node, admin = Identity.generate(), Identity.generate()
        run.store.add_key(node.public_key, node.node_id)
        run.store.add_key(admin.public_key, admin.node_id, role="admin")
        w = Worker(f"{node.node_id}-d1", f"http://127.0.0.1:{free_port()}", "decode", "tiny",
                   api_token=token)
        await register(run.address, node, w)
        (member,) = run.server.plane.routable_workers()
        assert member.worker.api_token == token
        assert caps.member_from_dict(caps.member_to_dict(member)).worker.api_token == token
        assert token not in repr(member)
        client = ControlClient(run.address, admin)
        try:
            raw = seal(admin, "Status", b"").SerializeToString()
            status: pb.StatusReply = await client.call_raw("Status", raw)
        finally:
            await client.close()
        (shown,) = status.nodes
        assert [x.worker_id for x in shown.workers] == [w.worker_id]
        assert shown.workers[0].api_token == ""
        taken = Worker(w.worker_id, f"http://127.0.0.1:{free_port()}", "decode", "tiny",
                       api_token=token)
        other = Identity.generate()
        run.store.add_key(other.public_key, other.node_id)
        detail = await refused(run.address, other, grpc.StatusCode.ALREADY_EXISTS,
                               "worker_id_taken", taken)
        assert token not in detail


def test_the_same_worker_id_twice_in_one_report_is_refused() -> None:
    with pytest.raises(ValueError, match=r"workers\[1\].worker_id: 'w' appears twice"):
        caps.check_workers([worker("w", 1), worker("w", 2)])


def node(node_id: str, state: str, *workers: Worker) -> Node:
    return Node(node_id, b"k", make_report("h", workers), 0.0, 0.0, state)


def test_claims_given_up_when_the_owner_leaves_and_ports_when_it_is_dead() -> None:
    mine = worker("x-d1", 9000)
    for state, want in ((ALIVE, "worker_id_taken"), (DEAD, "worker_id_taken"), (LEFT, None)):
        others = [node("x", state, mine)]
        report = make_report("h", (mine,))
        if want is None:
            claims.check("y", report, "127.0.0.1", "", others)
        else:
            with pytest.raises(claims.Refused) as e:
                claims.check("y", report, "127.0.0.1", "", others)
            assert e.value.reason == want
    # a dead node's port may be bound again by another node (its worker id may not)
    claims.check("y", make_report("h", (worker("y-d1", 9000),)), "127.0.0.1", "",
                 [node("x", DEAD, mine)])


@pytest.mark.parametrize(("peer", "host"), [
    ("ipv4:10.0.0.5:41234", "10.0.0.5"), ("ipv6:[::1]:41234", "::1"),
    ("ipv6:[fe80::1]:9", "fe80::1"), ("unix:/tmp/x.sock", ""), ("", "")])
def test_peer_host(peer: str, host: str) -> None:
    assert claims.peer_host(peer) == host


def test_a_remote_node_may_not_report_loopback_or_another_hosts_workers() -> None:
    for host in ("127.0.0.1", "10.0.0.6", "gpu-7"):
        with pytest.raises(claims.Refused) as e:
            claims.check("y", make_report("h", (worker("y-d1", 80, host=host),)), "10.0.0.5",
                         "", [])
        assert e.value.reason == "not_own_address"
    claims.check("y", make_report("h", (worker("y-d1", 80, host="10.0.0.5"),)), "10.0.0.5",
                 "", [])
    claims.check("y", make_report("h", (worker("y-d1", 80, host="GPU-7"),)), "10.0.0.5",
                 "gpu-7", [])


def test_a_trust_store_from_before_host_pins_opens_and_pins(tmp_path: Path) -> None:
    import sqlite3

    from meshd.coordinator.store import DB_FILE, Store

    old = sqlite3.connect(tmp_path / DB_FILE)
    old.execute("CREATE TABLE keys (public_key BLOB PRIMARY KEY, node_id TEXT NOT NULL, "
                "label TEXT NOT NULL DEFAULT '', role TEXT NOT NULL DEFAULT 'agent', "
                "state TEXT NOT NULL DEFAULT 'trusted', source TEXT NOT NULL DEFAULT "
                "'operator', added_at REAL NOT NULL, revoked_at REAL)")
    ident = Identity.generate()
    old.execute("INSERT INTO keys(public_key, node_id, added_at) VALUES (?, ?, 0)",
                (ident.public_key, ident.node_id))
    old.commit()
    old.close()
    store = Store(tmp_path)
    try:
        rec = store.key(ident.public_key)
        assert rec is not None and rec.pinned_host == ""
        store.add_key(ident.public_key, ident.node_id, pinned_host="10.1.2.3")
        assert store.key(ident.public_key).pinned_host == "10.1.2.3"
    finally:
        store.close()


async def test_a_restart_keeps_each_nodes_state_and_revocation_evicts_at_once(
        tmp_path: Path) -> None:
    """Issue 12 §6: after a registry restart dead and revoked nodes are not routed, not even
    briefly; a revocation takes a node out of the routing set on the next answer."""
    from meshd.coordinator.store import Store

    alive, dead, revoked, offline = (Identity.generate() for _ in range(4))
    async with control_server(make_config(tmp_path)) as run:
        for ident in (alive, dead, revoked, offline):
            run.store.add_key(ident.public_key, ident.node_id)
            await register(run.address, ident, worker(f"{ident.node_id}-d1", free_port()))
        plane = run.server.plane
        plane.table.nodes[dead.node_id].last_heartbeat -= 3600  # silent for an hour
        await plane.sweep()
        assert plane.table.nodes[dead.node_id].state == DEAD
        run.store.revoke_key(revoked.node_id)
        routed = {m.node_id for m in plane.routable_workers()}
        assert routed == {alive.node_id, offline.node_id}  # out at once, before any sweep
        await plane.sweep()
        assert plane.table.nodes[revoked.node_id].state == LEFT
    store = Store(tmp_path)  # revoked while the registry is down
    store.revoke_key(offline.node_id)
    store.close()
    async with control_server(make_config(tmp_path)) as run:
        states = {nid: n.state for nid, n in run.server.plane.table.nodes.items()}
        assert states == {alive.node_id: ALIVE, dead.node_id: DEAD, revoked.node_id: LEFT,
                          offline.node_id: LEFT}
        assert {m.node_id for m in run.server.plane.routable_workers()} == {alive.node_id}


async def register_attrs(address: str, ident: Identity, attributes: dict[str, str]
                         ) -> pb.RegisterReply:
    return await register_report(address, ident, caps.Capabilities(
        host=caps.Host("h", 2, 8 << 30), attributes=attributes))


async def test_a_node_claims_a_privacy_class_only_as_the_operator_pinned_it(
        tmp_path: Path) -> None:
    """Issue 12 §1: a node's privacy class (and any attribute the operator pinned for its key)
    is what the trust store says, or its report is refused naming the attribute."""
    async with control_server(make_config(tmp_path)) as run:
        node = Identity.generate()
        run.store.add_key(node.public_key, node.node_id)
        with pytest.raises(ControlError) as e:
            await register_attrs(run.address, node, {"privacy": "restricted"})
        assert (e.value.code, e.value.reason) == (grpc.StatusCode.PERMISSION_DENIED,
                                                  "attribute_not_pinned")
        assert "privacy=restricted" in e.value.detail and "meshd trust add" in e.value.detail
        await register_attrs(run.address, node, {"zone": "eu"})  # unguarded, unpinned: free
        run.store.add_key(node.public_key, node.node_id,
                          pinned_attrs={"privacy": "restricted", "zone": "eu"})
        await register_attrs(run.address, node, {"privacy": "restricted", "zone": "eu"})
        (n,) = run.server.plane.table.nodes.values()
        assert n.capabilities.attributes == {"privacy": "restricted", "zone": "eu"}
        for claim in ({"privacy": "secret"}, {"privacy": "restricted", "zone": "us"}):
            with pytest.raises(ControlError) as e:
                await register_attrs(run.address, node, claim)
            assert e.value.reason == "attribute_not_pinned", claim
        await register_attrs(run.address, node, {})  # claiming less is always allowed
        assert run.store.key(node.public_key).attributes == {"privacy": "restricted",
                                                             "zone": "eu"}
