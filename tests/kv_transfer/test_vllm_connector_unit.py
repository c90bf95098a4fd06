"""meshd's vLLM connector without vLLM: settings, params, load plans, leases, receive results and
the block-major layout adapter (a transfer over real TCP between two CPU-layout KV caches)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from meshd.kv_transfer.auth import Ed25519Authenticator, SharedSecretAuthenticator
from meshd.kv_transfer.conn import ServerConfig
from meshd.kv_transfer.tcp import TcpClient
from meshd.kv_transfer.transport import ErrorCode, Peer
from meshd.kv_transfer.vllm_layout import (
    BlockMajorMemory,
    BlockMajorTcpClient,
    BlockMajorTcpServer,
    block_order,
    layout_of,
    transport_name,
)
from meshd.kv_transfer.vllm_params import (
    ConnectorSettings,
    LeaseTable,
    LoadPlan,
    RecvResults,
    RemotePrefill,
    load_authenticator,
    plan_load,
    prefill_params,
    tokens_to_load,
)

SECRET = "unit-test-mesh-secret-0123456789"
BS = 32


def test_vllm_connector_module_does_not_load_without_vllm() -> None:
    import importlib.util

    import meshd.kv_transfer

    assert importlib.util.find_spec("meshd.kv_transfer.vllm_connector") is not None
    assert "vllm" not in dir(meshd.kv_transfer)


# ---------------------------------------------------------------------------------- settings


def test_settings_parse_and_validate(tmp_path: Path) -> None:
    s = ConnectorSettings.parse({"secret_file": "/s", "host": "0.0.0.0", "port": "23456",
                                 "advertise_host": "10.0.0.5", "lease_timeout_s": 5},
                                producer=True)
    assert (s.port, s.remote_host, s.lease_timeout_s, s.transport) == (23456, "10.0.0.5", 5.0,
                                                                       "tcp")
    assert ConnectorSettings.parse({"secret_file": "/s"}, producer=False).port == 0
    bad = [
        ({}, "secret_file"),
        ({"secret_file": "/s"}, "port"),  # producer without a port
        ({"secret_file": "/s", "port": 1, "bogus": 1}, "unknown keys"),
        ({"secret_file": "/s", "port": 70000}, "port"),
        ({"secret_file": "/s", "port": 1, "lease_timeout_s": 0}, "lease_timeout_s"),
        ({"secret_file": "/s", "port": 1, "transport": "nccl"}, "transport"),
        ({"secret_file": "/s", "node_key_file": "/k", "port": 1}, "not both"),
        ({"node_key_file": "/k", "port": 1}, "trusted_keys_file"),
    ]
    for extra, needle in bad:
        with pytest.raises(ValueError, match=needle):
            ConnectorSettings.parse(extra, producer=True)


def test_authenticators_from_files(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\nignored\n")
    auth = load_authenticator(ConnectorSettings(secret_file=str(secret)), "n1")
    assert isinstance(auth, SharedSecretAuthenticator)
    assert auth.prove("client", b"t") == SharedSecretAuthenticator(SECRET.encode()).prove(
        "client", b"t")
    short = tmp_path / "short"
    short.write_text("too-short\n")
    with pytest.raises(ValueError):
        load_authenticator(ConnectorSettings(secret_file=str(short)))
    with pytest.raises(ValueError, match="secret_file"):
        load_authenticator(ConnectorSettings(secret_file=str(tmp_path / "missing")))

    from nacl.signing import SigningKey

    key = SigningKey.generate()
    key_file, trusted = tmp_path / "node.key", tmp_path / "trusted"
    key_file.write_text(key.encode().hex() + "\n")
    trusted.write_text(bytes(key.verify_key).hex() + "\n")
    settings = ConnectorSettings(node_key_file=str(key_file), trusted_keys_file=str(trusted))
    key_file.chmod(0o644)
    with pytest.raises(ValueError, match="readable by others"):
        load_authenticator(settings)
    key_file.chmod(0o600)
    ed = load_authenticator(settings)
    assert isinstance(ed, Ed25519Authenticator)
    assert ed.identity() == bytes(key.verify_key)


# ------------------------------------------------------------------------------------ params


def test_prefill_params_round_trip() -> None:
    params = prefill_params(request_id="cmpl-1-0-abcd1234", block_ids=[7, 3, 9],
                            engine_id="p0", host="10.0.0.1", port=23456, tp_size=1,
                            num_tokens=80, transport="tcp")
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert {"remote_engine_id", "remote_block_ids", "remote_request_id", "remote_host",
            "remote_port", "tp_size"} <= set(params)
    remote = RemotePrefill.parse(params)
    assert remote == RemotePrefill(Peer("10.0.0.1", 23456), "cmpl-1-0-abcd1234", (7, 3, 9),
                                   "p0", 1)
    # What a client sends the prefill side, and what the decode side gets when P answered none.
    assert RemotePrefill.parse({"do_remote_decode": True, "do_remote_prefill": False}) \
        == "not_remote_prefill"
    assert RemotePrefill.parse(None) == "not_remote_prefill"
    # HMA-style nesting of one group is accepted.
    nested = RemotePrefill.parse({**params, "remote_block_ids": [[7, 3, 9]]})
    assert not isinstance(nested, str) and nested.block_ids == (7, 3, 9)


@pytest.mark.parametrize(("change", "reason"), [
    ({"remote_host": None}, "bad_peer"),
    ({"remote_port": "23456"}, "bad_peer"),
    ({"remote_port": True}, "bad_peer"),
    ({"remote_request_id": ""}, "bad_request_id"),
    ({"remote_block_ids": []}, "bad_block_ids"),
    ({"remote_block_ids": [1, -2]}, "bad_block_ids"),
    ({"remote_block_ids": [1, 2.0]}, "bad_block_ids"),
    ({"tp_size": 0}, "bad_tp_size"),
    ({"meshd_transport": "nccl"}, "unsupported_transport"),
])
def test_remote_prefill_rejects_bad_params(change: dict[str, object], reason: str) -> None:
    params = prefill_params(request_id="r", block_ids=[1, 2], engine_id="p", host="h",
                            port=1, tp_size=1, num_tokens=40, transport="tcp")
    assert RemotePrefill.parse({**params, **change}) == reason


def _remote(n_blocks: int) -> RemotePrefill:
    return RemotePrefill(Peer("h", 1), "rr", tuple(range(100, 100 + n_blocks)), "p", 1)


def test_tokens_to_load() -> None:
    assert tokens_to_load(_remote(4), 100, 0, BS) == 100
    assert tokens_to_load(_remote(4), 100, 64, BS) == 36  # two blocks cached locally
    assert tokens_to_load(_remote(4), 128, 0, BS) == 128
    assert tokens_to_load(_remote(3), 100, 0, BS) == 0  # P holds less than the prompt
    assert tokens_to_load(_remote(4), 100, 40, BS) == 0  # unaligned local hit
    assert tokens_to_load(_remote(4), 100, 100, BS) == 0


def test_plan_load_maps_the_uncached_tail() -> None:
    local = [5, 6, 7, 8]
    plan = plan_load("d1", _remote(4), local, 100, 100, BS)
    assert isinstance(plan, LoadPlan)
    assert plan.remote_block_ids == (100, 101, 102, 103) and plan.local_block_ids == (5, 6, 7, 8)
    plan = plan_load("d1", _remote(4), local, 100, 36, BS)  # blocks 5, 6 were a local hit
    assert isinstance(plan, LoadPlan)
    assert plan.remote_block_ids == (102, 103) and plan.local_block_ids == (7, 8)
    assert LoadPlan.from_dict(plan.to_dict()) == plan
    # vLLM may allocate a block more than the prompt needs (lookahead); it is not loaded.
    plan = plan_load("d1", _remote(4), [*local, 9], 100, 100, BS)
    assert isinstance(plan, LoadPlan) and plan.local_block_ids == (5, 6, 7, 8)
    assert plan_load("d1", _remote(4), local, 100, 30, BS) == "unaligned"
    assert plan_load("d1", _remote(4), local, 100, 0, BS) == "unaligned"
    assert plan_load("d1", _remote(3), local, 100, 100, BS) == "block_count"
    assert plan_load("d1", _remote(4), local[:3], 100, 100, BS) == "block_count"


# ------------------------------------------------------------------------------------ leases


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lease_ends_when_sent() -> None:
    clock = FakeClock()
    leases = LeaseTable(30.0, lookup_wait_s=0.01, clock=clock)
    leases.grant("r1", [3, 4])
    assert leases.take_done() == set()
    assert leases.lookup("r1") == [3, 4]
    leases.on_sent("r1")
    assert leases.lookup("r1") is None  # served once only
    assert leases.take_done() == {"r1"}
    assert leases.take_done() == set()
    assert (leases.stats.granted, leases.stats.sent, leases.stats.expired) == (1, 1, 0)


def test_lease_expires_and_lookup_renews() -> None:
    clock = FakeClock()
    leases = LeaseTable(10.0, lookup_wait_s=0.01, transfer_timeout_s=30.0, clock=clock)
    leases.grant("idle", [1])
    leases.grant("busy", [2])
    clock.now += 5
    assert leases.lookup("busy") == [2]  # a transfer starts: held >= now + 31 s
    clock.now += 6
    assert leases.take_done() == {"idle"}
    assert leases.held() == {"busy": (2,)}
    clock.now += 25
    assert leases.take_done() == {"busy"}
    assert len(leases) == 0 and leases.stats.expired == 2
    leases.on_sent("busy")  # a late ack after expiry changes nothing
    assert leases.take_done() == set()


def test_lease_lookup_waits_for_a_grant_on_its_way() -> None:
    leases = LeaseTable(30.0, lookup_wait_s=2.0)
    timer = threading.Timer(0.2, leases.grant, args=("late", [9]))
    timer.start()
    t0 = time.monotonic()
    assert leases.lookup("late") == [9]
    assert 0.1 < time.monotonic() - t0 < 1.5
    t0 = time.monotonic()
    assert LeaseTable(30.0, lookup_wait_s=0.2).lookup("never") is None
    assert time.monotonic() - t0 < 1.0


def test_lease_release() -> None:
    leases = LeaseTable(30.0, lookup_wait_s=0.01)
    leases.grant("r", [1])
    leases.release("r")
    assert leases.take_done() == {"r"}
    assert leases.lookup("r") is None


def test_recv_results_report_failures_once() -> None:
    recv = RecvResults()
    recv.succeeded("a", 1024, 0.01)
    recv.failed("b", [7, 8], "auth")
    finished, failed = recv.take()
    assert finished == {"a", "b"} and failed == {"b"}
    assert recv.take_bad_blocks() == {7, 8}
    assert recv.take() == (set(), set()) and recv.take_bad_blocks() == set()
    assert (recv.ok_total, recv.failed_total, recv.errors) == (1, 1, {"auth": 1})


# ------------------------------------------------------------------------------------ layout


def cpu_views(num_blocks: int, num_layers: int = 2, heads: int = 2, head_dim: int = 64,
              seed: int | None = None, gap: int = 0) -> list[torch.Tensor]:
    """Like vLLM 0.32's CPU backend: one int8 buffer, one [B, H, N, 2*head_dim] bf16 view per
    layer (`gap` extra bytes between layers to mimic offsets)."""
    block_bytes = heads * BS * 2 * head_dim * 2
    layer_bytes = num_blocks * block_bytes + gap
    buf = torch.zeros(num_layers * layer_bytes, dtype=torch.int8)
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        buf.copy_(torch.randint(-128, 127, buf.shape, generator=gen, dtype=torch.int8))
    views = []
    for layer in range(num_layers):
        raw = buf[layer * layer_bytes : layer * layer_bytes + num_blocks * block_bytes]
        views.append(raw.view(torch.bfloat16).view(num_blocks, heads, BS, 2 * head_dim))
    return views


def test_block_order_and_layout() -> None:
    views = cpu_views(8)
    assert block_order(views[0]) == "HNC"
    assert transport_name("HNC") == "tcp+vllm-BHNC"
    layout = layout_of(views, 2, 64, BS)
    assert layout.bytes_per_block_per_layer == views[0][0].numel() * 2
    with pytest.raises(ValueError, match="bytes per block"):
        layout_of(views, 1, 64, BS)
    # FlashAttention-style (2, B, N, H, D) is not a per-block dense range.
    fa = torch.zeros(2, 8, BS, 2, 64, dtype=torch.bfloat16).permute(1, 0, 2, 3, 4)
    with pytest.raises(ValueError, match="4-D"):
        block_order(fa)
    with pytest.raises(ValueError, match="dense"):
        block_order(torch.zeros(8, 2, BS, 256)[:, :, :, :128])
    # Head-minor blocks ([B, N, H, C] in memory) are dense too, under another name.
    assert block_order(torch.zeros(8, BS, 2, 128).permute(0, 2, 1, 3)) == "NHC"


def test_block_major_memory_segments() -> None:
    views = cpu_views(8, gap=4096)
    mem = BlockMajorMemory(views, layout_of(views, 2, 64, BS))
    size = mem.layout.bytes_per_block_per_layer
    views[1][5].fill_(1.0)
    segs = mem.segments([2, 3, 5])
    assert [len(s) for s in segs] == [2 * size, size, 2 * size, size]  # runs coalesced
    assert bytes(segs[3][:4]) == b"\x80?\x80?"  # bf16 1.0, layer 1 block 5
    assert mem.stream_bytes(3) == 3 * 2 * size
    strided = [v[::2] for v in cpu_views(8)]  # blocks not packed: one range per block
    smem = BlockMajorMemory(strided, layout_of(strided, 2, 64, BS))
    assert [len(s) for s in smem.segments([0, 1])] == [size] * 4
    with pytest.raises(ValueError, match="shares its memory"):
        BlockMajorMemory([views[0], views[0]], layout_of(views, 2, 64, BS))
    with pytest.raises(ValueError, match="dtype"):
        other = [v.view(torch.float16) for v in views]
        BlockMajorMemory(other, layout_of(views, 2, 64, BS))


def test_block_major_transfer_over_tcp() -> None:
    src, dst = cpu_views(16, seed=1), cpu_views(16)
    layout = layout_of(src, 2, 64, BS)
    auth = SharedSecretAuthenticator(SECRET.encode(), "p")
    leases = LeaseTable(30.0, lookup_wait_s=0.5)
    server = BlockMajorTcpServer(src, layout, auth, leases, "127.0.0.1", 0,
                                 ServerConfig(transfer_timeout_s=10.0))
    client = BlockMajorTcpClient(dst, layout, SharedSecretAuthenticator(SECRET.encode(), "d"))
    try:
        assert server.name == client.name == "tcp+vllm-BHNC"
        leases.grant("p-req", [3, 4, 9, 10])
        result = client.fetch(server.address, "p-req", [3, 4, 9, 10], [0, 1, 7, 8], 10.0)
        assert result.ok, result.error
        for s, d in zip(src, dst, strict=True):
            got, want = d.view(torch.int16), s.view(torch.int16)  # bitwise (random bytes: NaNs)
            assert torch.equal(got[[0, 1, 7, 8]], want[[3, 4, 9, 10]])
            assert not d[2:7].any()  # nothing else written
        # Acked -> freed (the server handles the ack after the client's fetch returned).
        done: set[str] = set()
        end = time.monotonic() + 5.0
        while not done and time.monotonic() < end:
            done = leases.take_done()
            time.sleep(0.01)
        assert done == {"p-req"}
        again = client.fetch(server.address, "p-req", [3], [2], 5.0)
        assert not again.ok and again.error is not None
        assert again.error.code == ErrorCode.UNKNOWN_REQUEST
        # Wrong secret: refused in the handshake, no block moves.
        leases.grant("p2", [5])
        wrong = BlockMajorTcpClient(dst, layout, SharedSecretAuthenticator(b"x" * 32))
        bad = wrong.fetch(server.address, "p2", [5], [5], 5.0)
        assert not bad.ok and bad.error is not None and bad.error.code == ErrorCode.AUTH
        assert not dst[0][5].any()
        # A FlashAttention-layout peer is refused by transport name, not fed reordered bytes.
        fa = [torch.zeros(layout.tensor_shape(16), dtype=torch.bfloat16) for _ in range(2)]
        plain = TcpClient(fa, layout, SharedSecretAuthenticator(SECRET.encode()))
        mixed = plain.fetch(server.address, "p2", [5], [5], 5.0)
        assert not mixed.ok and mixed.error is not None
        assert mixed.error.code == ErrorCode.PROTOCOL
    finally:
        server.close()
