"""Join tokens with a use limit (`meshd trust token --uses N`): the store, the trust CLI, and
enrollment through the real gRPC control plane.

A KubeRay worker group's pods share one spec, so they share one token: each pod's own key
enrolls with one use, the N+1th key is refused `token_used`, every use is a key with source
`token:<id>`, and a revoked token enrolls nothing more (`token_revoked`) while, with `--keys`,
the keys it enrolled are refused from their next request on. Agents send the token's proof for
their key (meshd/enrollment.py): a proof lifted off the wire enrolls no other key, and a
token of several uses is never accepted bare.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from pathlib import Path

import grpc
import pytest
from support.control import control_server, make_agent, make_config, make_report, wait_for

from meshd import capabilities as caps
from meshd import cli, enrollment
from meshd.coordinator.store import DB_FILE, Store, TokenError
from meshd.node_agent.agent import AgentRefused
from meshd.node_agent.client import ControlClient, ControlError
from meshd.node_agent.identity import Identity, node_id_for
from meshd.proto.v1 import control_pb2 as pb


def make_key(i: int) -> bytes:
    return bytes([i]) * 32


def redeem(store: Store, token: str, i: int, now: float | None = None,
           bare: bool = False) -> str:
    """Enroll key `i` with `token` as an agent does (its proof), or with the bare secret."""
    key = make_key(i)
    presented = token if bare else enrollment.proof(token, key)
    return store.redeem_token(presented, key, node_id_for(key), now or time.time()).node_id


def test_a_proof_enrolls_its_own_key_only(state_dir: Path) -> None:
    """What an agent sends names the token and proves it for the key that signs the request;
    the same bytes presented for another key, or a forged proof, are `invalid`. A one-time
    token still enrolls with its bare secret (agents from before proofs); one of several
    uses never does."""
    store = Store(state_dir)
    token = store.create_token(60, uses=5)
    sent = enrollment.proof(token, make_key(1))
    assert sent.startswith("mjp_") and token.partition(".")[2] not in sent
    assert enrollment.proof(token, make_key(1)) == sent != enrollment.proof(token, make_key(2))
    for key in (make_key(2), make_key(3)):  # a captured proof, replayed by another key
        with pytest.raises(TokenError) as info:
            store.redeem_token(sent, key, node_id_for(key), time.time())
        assert info.value.reason == "invalid"
    with pytest.raises(TokenError, match="never bare"):
        redeem(store, token, 4, bare=True)
    assert store.redeem_token(sent, make_key(1), node_id_for(make_key(1)), time.time())
    one_time = store.create_token(60)
    redeem(store, one_time, 5, bare=True)
    assert [t.uses for t in store.tokens()] == [1, 1]
    for junk in ("", "mjt_", "mjt_abc", "mjt_abc.", "mjp_abc.xyz", "bogus"):
        assert enrollment.proof(junk, make_key(1)) == junk  # not a token: sent as it is
    store.close()


def test_a_token_enrolls_up_to_its_uses_one_key_each(state_dir: Path) -> None:
    store = Store(state_dir)
    token = store.create_token(60, "gpu group", uses=3)
    ids = [redeem(store, token, i) for i in (1, 2, 3)]
    with pytest.raises(TokenError) as info:
        redeem(store, token, 4)
    assert info.value.reason == "used" and "3 times" in str(info.value)
    (tok,) = store.tokens()
    assert (tok.uses, tok.max_uses, tok.state(time.time())) == (3, 3, "used")
    enrolled = store.enrolled_by(tok.token_id)
    assert [k.node_id for k in enrolled] == ids
    assert {(k.source, k.label, k.role, k.state) for k in enrolled} == {
        (f"token:{tok.token_id}", "gpu group", "agent", "trusted")}
    assert store.key(make_key(4)) is None  # a refused use trusts nothing
    store.close()


@pytest.mark.parametrize(("uses", "reason"), [(1, "used"), (5, "revoked"), (0, "expired")])
def test_refusals_in_the_order_redemption_checks(state_dir: Path, uses: int,
                                                 reason: str) -> None:
    """A one-time token's second key: used; a revoked one: revoked (before used or expired);
    past its expiry: expired. A wrong secret or id: invalid, whatever the token's state."""
    store = Store(state_dir)
    token = store.create_token(60, uses=max(uses, 1))
    now = time.time()
    if uses == 1:
        redeem(store, token, 1)
    elif uses == 5:
        store.revoke_token(token)
    else:
        now += 61
    with pytest.raises(TokenError) as info:
        redeem(store, token, 2, now)
    assert info.value.reason == reason
    assert store.tokens()[0].state(now) == reason
    for bad, bare in ((token[:-2] + "xx", False), (token[:-2] + "xx", True),
                      ("mjt_000000000000." + token.partition(".")[2], False), ("junk", True)):
        with pytest.raises(TokenError) as info:
            redeem(store, bad, 3, now, bare=bare)
        assert info.value.reason == "invalid"
    store.close()


def test_bounds_and_revocation_by_id(state_dir: Path) -> None:
    store = Store(state_dir)
    for uses in (0, -1, 10_001):
        with pytest.raises(ValueError, match=r"uses must be in 1\.\.10000"):
            store.create_token(60, uses=uses)
    token = store.create_token(60, uses=2)
    token_id = token.removeprefix("mjt_").partition(".")[0]
    first = store.revoke_token(token_id, now=100.0)
    again = store.revoke_token(token, now=200.0)  # the whole token works too; keeps the time
    assert first.revoked_at == again.revoked_at == 100.0
    with pytest.raises(KeyError):
        store.revoke_token("nosuch")
    store.close()


def test_a_store_from_before_use_limits_keeps_its_tokens_one_time(state_dir: Path) -> None:
    """The old schema (no max_uses, uses, revoked_at): a used token stays used, an unused one
    enrolls exactly one key."""
    db = sqlite3.connect(state_dir / DB_FILE)
    db.execute("CREATE TABLE join_tokens (token_id TEXT PRIMARY KEY, secret_hash BLOB NOT NULL,"
               " label TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, expires_at REAL "
               "NOT NULL, used_at REAL, used_by BLOB)")
    far = time.time() + 600
    for token_id, secret, used_at in (("a" * 12, "s1", 1.0), ("b" * 12, "s2", None)):
        db.execute("INSERT INTO join_tokens VALUES (?, ?, '', 0, ?, ?, NULL)",
                   (token_id, hashlib.sha256(secret.encode()).digest(), far, used_at))
    db.commit()
    db.close()
    store = Store(state_dir)
    with pytest.raises(TokenError, match="already used"):
        redeem(store, f"mjt_{'a' * 12}.s1", 1)
    redeem(store, f"mjt_{'b' * 12}.s2", 2)  # an agent's proof works with the old hashes
    with pytest.raises(TokenError, match="already used"):
        redeem(store, f"mjt_{'b' * 12}.s2", 3, bare=True)
    assert [(t.uses, t.max_uses) for t in store.tokens()] == [(1, 1), (1, 1)]
    store.close()


def test_trust_cli_token_list_and_revoke_token(state_dir: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    def meshd(*argv: str) -> tuple[int, str, str]:
        code = cli.main(["trust", "--state-dir", str(state_dir), *argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, _ = meshd("token", "--uses", "2", "--ttl", "600", "--label", "kuberay-gpu")
    token = out.strip()
    assert code == 0 and token.startswith("mjt_")
    store = Store(state_dir)
    a, b = redeem(store, token, 1), redeem(store, token, 2)
    token_id = store.tokens()[0].token_id
    _, listing, _ = meshd("list")
    assert f"token:{token_id}" in listing and a in listing and b in listing
    row = next(line for line in listing.splitlines() if line.startswith(token_id))
    assert row.split()[1:3] == ["used", "2/2"] and row.endswith("kuberay-gpu")

    code, out, _ = meshd("revoke-token", token_id)
    assert code == 0 and f"revoked token {token_id} (2 of 2 uses taken)" in out
    assert f"still trusted: {a}" in out and "add --keys" in out
    code, out, _ = meshd("revoke-token", token, "--keys")
    assert code == 0 and f"revoked: {a}" in out and f"revoked: {b}" in out
    assert {k.state for k in store.enrolled_by(token_id)} == {"revoked"}
    assert meshd("revoke-token", "nosuch")[2].startswith("meshd: no join token with id")
    assert "--uses: uses must be in" in meshd("token", "--uses", "0")[2]
    store.close()


def register_payload(token: str) -> bytes:
    return pb.RegisterRequest(capabilities=caps.to_pb(make_report()),
                              join_token=token).SerializeToString()


async def test_pods_of_one_group_enroll_through_the_control_plane(state_dir: Path) -> None:
    """Three agents with fresh keys and one token of two uses, over real gRPC: two enroll
    (each restarts without using the token again), the third is refused `token_used`; after
    `revoke-token --keys` the enrolled keys are refused and the token enrolls nothing more."""
    async with control_server(make_config(state_dir)) as run:
        token = run.store.create_token(60, "gpu", uses=2)
        agents = [make_agent(run.address, token=token) for _ in range(2)]
        for agent in agents:
            stop = asyncio.Event()
            task = asyncio.create_task(agent.run(stop))
            await wait_for(lambda a=agent: a.status.registered)  # type: ignore[misc]
            stop.set()
            await task
        again = make_agent(run.address, agents[0].identity, token=token)  # a restarted pod
        stop = asyncio.Event()
        task = asyncio.create_task(again.run(stop))
        await wait_for(lambda: again.status.registered)
        stop.set()
        await task
        (tok,) = run.store.tokens()
        assert tok.uses == 2  # a trusted key's registration never counts a use
        with pytest.raises(AgentRefused, match="already used 2 times"):
            await asyncio.wait_for(make_agent(run.address, token=token).run(asyncio.Event()), 5)

        run.store.revoke_token(tok.token_id)
        for k in run.store.enrolled_by(tok.token_id):
            run.store.revoke_key(k.node_id)
        client = ControlClient(run.address, agents[1].identity)
        with pytest.raises(ControlError) as info:
            await client.register(caps.to_pb(make_report()), token)
        assert (info.value.code, info.value.reason) == (grpc.StatusCode.PERMISSION_DENIED,
                                                        "revoked_key")
        await client.close()
        # an eavesdropper's copy of a pod's enrollment: the proof, bound to that pod's key
        spare = run.store.create_token(60, uses=3)
        pod = Identity.generate()
        attacker = ControlClient(run.address, Identity.generate())
        with pytest.raises(ControlError) as info:
            await attacker.register(caps.to_pb(make_report()),
                                    enrollment.proof(spare, pod.public_key))
        assert (info.value.code, info.value.reason) == (grpc.StatusCode.PERMISSION_DENIED,
                                                        "token_invalid")
        await attacker.close()
        fresh = run.store.create_token(60, uses=1)
        run.store.revoke_token(fresh)
        client = ControlClient(run.address, Identity.generate())
        with pytest.raises(ControlError) as info:
            await client.register(caps.to_pb(make_report()),
                                  enrollment.proof(fresh, client.signer.public_key))
        assert (info.value.code, info.value.reason) == (grpc.StatusCode.PERMISSION_DENIED,
                                                        "token_revoked")
        await client.close()
        counts = {s.labels["reason"]: s.value for m in run.server.metrics.registry.collect()
                  for s in m.samples if s.name == "meshd_rejections_total"}
        assert counts == {"token_used": 1, "revoked_key": 1, "token_revoked": 1,
                          "token_invalid": 1}
        assert [t.uses for t in run.store.tokens()] == [2, 0, 0]
