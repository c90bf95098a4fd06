"""Several transports on one port (`mux.py`) and the per-pair pick from host facts."""

from __future__ import annotations

import time

import pytest
import torch

from meshd.kv_transfer.auth import SharedSecretAuthenticator
from meshd.kv_transfer.layout import BlockLayout
from meshd.kv_transfer.mux import make_mux_server
from meshd.kv_transfer.select import HostFacts, pick
from meshd.kv_transfer.testing import DictSource, make_kv
from meshd.kv_transfer.transport import ErrorCode, make_client

LAYOUT = BlockLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", block_size=4)
AUTH = SharedSecretAuthenticator(b"m" * 32, "t")


def test_one_port_serves_tcp_and_shm() -> None:
    src = make_kv(LAYOUT, 12, seed=7)
    source = DictSource({"a": [1, 2], "b": [5, 9]})
    mux, skipped = make_mux_server(["shm", "tcp"], src, LAYOUT, AUTH, source)
    dst = {name: make_kv(LAYOUT, 12, None) for name in ("tcp", "shm")}
    clients = {name: make_client(name, kv, LAYOUT, AUTH) for name, kv in dst.items()}
    try:
        assert (mux.offered, mux.wire_names, skipped) == (["shm", "tcp"], ["shm", "tcp"], {})
        for name, rid, blocks in (("tcp", "a", [1, 2]), ("shm", "b", [5, 9])):
            res = clients[name].fetch(mux.address, rid, blocks, [0, 3], 10.0)
            assert res.ok, (name, res.error)
            for mine, theirs in zip(dst[name], src, strict=True):
                assert torch.equal(mine[:, [0, 3]], theirs[:, blocks])
        deadline = time.monotonic() + 5.0
        while mux.stats.snapshot()["served"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(source.sent) == ["a", "b"]
        assert mux.stats.snapshot()["connections"] == 2
    finally:
        for c in clients.values():
            c.close()
        mux.close()


def test_a_transport_the_mux_does_not_serve_is_refused_by_name() -> None:
    src = make_kv(LAYOUT, 8, seed=1)
    mux, _ = make_mux_server(["tcp"], src, LAYOUT, AUTH, DictSource({"a": [1]}))
    shm = make_client("shm", make_kv(LAYOUT, 8, None), LAYOUT, AUTH)
    wrong = make_client("tcp", make_kv(LAYOUT, 8, None), LAYOUT,
                        SharedSecretAuthenticator(b"x" * 32, "t"))
    try:
        res = shm.fetch(mux.address, "a", [1], [1], 5.0)
        assert not res.ok and res.error is not None
        assert res.error.code == ErrorCode.PROTOCOL and "server tcp v2" in res.error.message
        res = wrong.fetch(mux.address, "a", [1], [1], 5.0)
        assert not res.ok and res.error is not None and res.error.code == ErrorCode.AUTH
        assert mux.stats.snapshot()["served"] == 0
    finally:
        mux.close()


def test_transports_that_cannot_run_here_are_skipped() -> None:
    src = make_kv(LAYOUT, 8, seed=1)  # CPU tensors: no GPU transport can serve them
    mux, skipped = make_mux_server(["cuda_ipc", "nccl", "tcp"], src, LAYOUT, AUTH,
                                   DictSource({}))
    try:
        assert mux.offered == ["tcp"] and set(skipped) == {"cuda_ipc", "nccl"}
    finally:
        mux.close()
    with pytest.raises(ValueError, match="no transport"):
        make_mux_server(["cuda_ipc"], src, LAYOUT, AUTH, DictSource({}))


def test_one_transport_is_a_mux_of_one_and_senders_must_differ() -> None:
    from meshd.kv_transfer.mux import MuxServer
    from meshd.kv_transfer.transport import make_sender, make_server

    kv = make_kv(LAYOUT, 4, None)
    server = make_server("tcp", kv, LAYOUT, AUTH, DictSource({}))
    try:
        assert (server.name, server.offered) == ("tcp", ["tcp"])  # type: ignore[attr-defined]
    finally:
        server.close()
    a, b = make_sender("tcp", kv, LAYOUT), make_sender("tcp", kv, LAYOUT)
    with pytest.raises(ValueError, match="distinct names"):
        MuxServer([a, b], ["tcp", "tcp"], AUTH, DictSource({}))


A = HostFacts("a", "10.0.0.1", gpus=True, rdma=True)
A2 = HostFacts("a", "10.0.0.1", gpus=True)
B = HostFacts("b", "10.0.0.2", gpus=True, rdma=True)
B_PLAIN = HostFacts("b", "10.0.0.2", gpus=True)


@pytest.mark.parametrize(("local", "remote", "device", "offered", "expected"), [
    (A, A2, "cpu", ["tcp", "shm"], "shm"),
    (A, B, "cpu", ["tcp", "shm"], "tcp"),
    (A, A2, "cuda", ["cuda_ipc", "nccl", "tcp"], "cuda_ipc"),
    (A, B, "cuda", ["cuda_ipc", "nccl", "tcp"], "nccl"),
    (A, B, "cuda", ["cuda_ipc", "tcp"], "tcp"),  # P could not build nccl (no cupy)
    (A, B_PLAIN, "cuda", ["cuda_ipc", "nccl", "tcp"], "tcp"),  # no shared fabric
    (A, None, "cuda", ["cuda_ipc", "nccl", "tcp"], "tcp"),  # P sent no facts
])
def test_pick(local: HostFacts, remote: HostFacts | None, device: str, offered: list[str],
              expected: str) -> None:
    assert pick(local, remote, device, offered).name == expected


def test_pick_without_tcp_and_facts_from_the_wire() -> None:
    with pytest.raises(ValueError, match="tcp is not offered"):
        pick(A, B_PLAIN, "cuda", ["cuda_ipc"])
    assert HostFacts.from_dict(A.to_dict()) == A
    assert HostFacts.from_dict({"hostname": "h"}) == HostFacts("h")
    for bad in ({}, {"hostname": 3}, {"hostname": "h", "rdma": "yes"},
                {"hostname": "h", "address": 1}, "h"):
        assert HostFacts.from_dict(bad) is None  # type: ignore[arg-type]


def test_views_kind_is_part_of_the_mux_wire_names() -> None:
    views = [torch.zeros(6, 2, 4, 32, dtype=torch.float16) for _ in range(2)]
    mux, _ = make_mux_server(["tcp", "shm"], views, LAYOUT, AUTH, DictSource({}), views="vllm")
    try:
        assert mux.wire_names == ["shm+vllm-BHNC", "tcp+vllm-BHNC"]
        assert mux.offered == ["tcp", "shm"]
    finally:
        mux.close()
