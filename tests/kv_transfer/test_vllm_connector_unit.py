"""meshd's vLLM connector without vLLM: settings, auth files, load plans, receive results and
the block-major layout adapter (a transfer over real TCP between two CPU-layout KV caches).
The shared params and leases are tested in test_params.py and test_leases.py."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from meshd.kv_transfer.auth import (
    Ed25519Authenticator,
    SharedSecretAuthenticator,
    load_authenticator,
)
from meshd.kv_transfer.conn import ServerConfig
from meshd.kv_transfer.leases import LeaseTable
from meshd.kv_transfer.params import RemotePrefill, prefill_params
from meshd.kv_transfer.puller import PullFailure
from meshd.kv_transfer.tcp import TcpClient
from meshd.kv_transfer.transport import ErrorCode, Peer, make_client, make_server
from meshd.kv_transfer.vllm_layout import BlockMajorMemory, block_order, layout_of
from meshd.kv_transfer.vllm_params import (
    TRANSPORTS,
    ConnectorSettings,
    LoadPlan,
    RecvResults,
    plan_load,
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
        ({"secret_file": "/s", "port": 1, "transport": "rdma"}, "transport"),
        ({"secret_file": "/s", "node_key_file": "/k", "port": 1}, "not both"),
        ({"node_key_file": "/k", "port": 1}, "trusted_keys_file"),
    ]
    for extra, needle in bad:
        with pytest.raises(ValueError, match=needle):
            ConnectorSettings.parse(extra, producer=True)


def test_authenticators_from_files(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\nignored\n")
    auth = load_authenticator(secret_file=str(secret), node_id="n1")
    assert isinstance(auth, SharedSecretAuthenticator)
    assert auth.prove("client", b"t") == SharedSecretAuthenticator(SECRET.encode()).prove(
        "client", b"t")
    short = tmp_path / "short"
    short.write_text("too-short\n")
    with pytest.raises(ValueError, match="at least 16"):
        load_authenticator(secret_file=str(short))
    with pytest.raises(ValueError, match="secret_file"):
        load_authenticator(secret_file=str(tmp_path / "missing"))

    from nacl.signing import SigningKey

    key = SigningKey.generate()
    key_file, trusted = tmp_path / "node.key", tmp_path / "trusted"
    key_file.write_text(key.encode().hex() + "\n")
    trusted.write_text(bytes(key.verify_key).hex() + "\n")
    files = {"node_key_file": str(key_file), "trusted_keys_file": str(trusted)}
    key_file.chmod(0o644)
    with pytest.raises(ValueError, match="lets other users read or write it"):
        load_authenticator(**files)
    key_file.chmod(0o600)
    ed = load_authenticator(**files)
    assert isinstance(ed, Ed25519Authenticator)
    assert ed.identity() == bytes(key.verify_key)


# ------------------------------------------------------------------------------- load plans


def test_connector_params_are_nixl_compatible() -> None:
    params = prefill_params(request_id="cmpl-1-0-abcd1234", block_ids=[7, 3, 9],
                            engine_id="p0", peer=Peer("10.0.0.1", 23456), tp_size=2,
                            num_tokens=80, transport="tcp", prompt=[1, 2, 3])
    assert set(params) == {"do_remote_prefill", "do_remote_decode", "remote_engine_id",
                           "remote_block_ids", "remote_request_id", "remote_host",
                           "remote_port", "tp_size", "remote_num_tokens", "meshd_transport",
                           "meshd_prompt_digest"}
    parsed = RemotePrefill.parse(params, allowed_transports=TRANSPORTS)
    assert isinstance(parsed, RemotePrefill)
    assert (parsed.peer, parsed.request_id, parsed.block_ids, parsed.tp_size,
            parsed.transport) == (Peer("10.0.0.1", 23456), "cmpl-1-0-abcd1234", (7, 3, 9), 2,
                                  "tcp")
    assert parsed.matches([1, 2, 3]) and not parsed.matches([1, 2, 4])
    for name in ("shm", "cuda_ipc", "nccl"):
        other = RemotePrefill.parse({**params, "meshd_transport": name},
                                    allowed_transports=TRANSPORTS)
        assert isinstance(other, RemotePrefill) and other.transport == name
    rdma = {**params, "meshd_transport": "rdma"}
    assert RemotePrefill.parse(rdma, allowed_transports=TRANSPORTS) == "unsupported_transport"


def test_load_plan_carries_the_transport() -> None:
    remote = RemotePrefill(Peer("h", 1), "rr", (100, 101, 102, 103), "p", 1, "shm")
    plan = plan_load("d1", remote, [5, 6, 7, 8], 100, 100, BS)
    assert isinstance(plan, LoadPlan) and plan.transport == "shm"
    assert LoadPlan.from_dict(plan.to_dict()) == plan


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


# --------------------------------------------------------------------------- receive results


def test_recv_results_report_failures_once() -> None:
    recv = RecvResults()
    recv.succeeded("a", 1024, 0.01)
    recv.failed("b", [7, 8], ErrorCode.AUTH)
    finished, failed = recv.take()
    assert finished == {"a", "b"} and failed == {"b"}
    assert recv.take_bad_blocks() == {7, 8}
    assert recv.take() == (set(), set()) and recv.take_bad_blocks() == set()
    recv.failed("c", [9], PullFailure.TRANSPORT_UNAVAILABLE)
    assert recv.take() == ({"c"}, {"c"}) and recv.take_bad_blocks() == {9}
    assert (recv.ok_total, recv.failed_total, recv.errors) == (
        1, 2, {"auth": 1, "transport_unavailable": 1})


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
    assert BlockMajorMemory(views, layout_of(views, 2, 64, BS)).wire_suffix == "+vllm-BHNC"
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
    leases = LeaseTable(30.0, transfer_timeout_s=10.0, lookup_wait_s=0.5)
    server = make_server("tcp", src, layout, auth, leases, "127.0.0.1", 0,
                         config=ServerConfig(transfer_timeout_s=10.0), views="vllm")
    client = make_client("tcp", dst, layout, SharedSecretAuthenticator(SECRET.encode(), "d"),
                         views="vllm")
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
        wrong = make_client("tcp", dst, layout, SharedSecretAuthenticator(b"x" * 32),
                            views="vllm")
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


def test_auto_serves_what_can_help_a_peer() -> None:
    from meshd.kv_transfer.select import HostFacts, offer

    plain, ib = HostFacts("a", gpus=True), HostFacts("a", gpus=True, rdma=True)
    assert offer("nccl", "cuda", plain, False) == ["nccl"]  # explicit: as configured
    assert offer("auto", "cpu", plain, True) == ["tcp", "shm"]
    assert offer("auto", "cuda", plain, True) == ["tcp", "cuda_ipc"]
    assert offer("auto", "cuda", ib, True) == ["tcp", "cuda_ipc", "nccl"]
    assert offer("auto", "cuda", ib, False) == ["tcp", "cuda_ipc"]  # no cupy


def test_decode_picks_per_pair_from_the_offer() -> None:
    from meshd.kv_transfer.select import HostFacts, pull_transport

    me = HostFacts("d-host", gpus=True, rdma=True)

    def offer(host: dict[str, Any] | None, offered: list[str]) -> RemotePrefill:
        params = prefill_params(request_id="r", block_ids=[1], engine_id="p",
                                peer=Peer("h", 1), transport=offered[0], num_tokens=4,
                                offered=offered if len(offered) > 1 else (), host=host)
        parsed = RemotePrefill.parse(params, allowed_transports=TRANSPORTS)
        assert isinstance(parsed, RemotePrefill)
        return parsed

    same = {"hostname": "d-host", "gpus": True}
    ib = {"hostname": "p-host", "gpus": True, "rdma": True}
    assert pull_transport(offer(same, ["tcp", "cuda_ipc"]), me, "cuda").name == "cuda_ipc"
    assert pull_transport(offer(ib, ["tcp", "cuda_ipc", "nccl"]), me, "cuda").name == "nccl"
    assert pull_transport(offer(ib, ["tcp", "cuda_ipc"]), me, "cuda").name == "tcp"
    assert pull_transport(offer({"hostname": 5}, ["tcp", "shm"]), me, "cpu").name == "tcp"
    assert pull_transport(offer(same, ["tcp", "shm"]), me, "cpu").name == "shm"
    only = pull_transport(offer(None, ["nccl"]), me, "cuda")
    assert only == ("nccl", "the only transport offered")


def test_settings_host_facts() -> None:
    s = ConnectorSettings.parse({"secret_file": "/s", "transport": "auto", "hostname": "gpu7",
                                 "rdma": "true", "nvlink": False, "advertise_host": "10.0.0.7"},
                                producer=False)
    assert s.facts("cuda").to_dict() == {"hostname": "gpu7", "address": "10.0.0.7",
                                         "gpus": True, "rdma": True, "nvlink": False}
    assert s.facts("cpu").gpus is False
    with pytest.raises(ValueError, match="rdma: must be true or false"):
        ConnectorSettings.parse({"secret_file": "/s", "rdma": "yes"}, producer=False)
