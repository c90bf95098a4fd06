"""Transport choice from two capability reports: exact choices, table-driven."""

from __future__ import annotations

import pytest

from meshd.capabilities import Capabilities, Gpu, Host, Rdma
from meshd.kv_transfer.select import choose_transport
from meshd.kv_transfer.transport import available_transports


def make_caps(host: str, gpus: int = 0, nvlink: bool = False, rdma: str = "",
              address: str = "") -> Capabilities:
    g = tuple(Gpu(i, "H100", f"GPU-{host}-{i}", 80 << 30,
                  nvlink_peers=("00000000:2A:00.0",) if nvlink else ()) for i in range(gpus))
    r: tuple[Rdma, ...] = ()
    if rdma:
        state, layer = rdma.split("/")
        r = (Rdma("mlx5_0", 1, state, layer, 400),)
    return Capabilities(Host(host, 64, 1 << 40, address=address), gpus=g, rdma=r)


A8 = make_caps("a", 8)
CASES = [
    # (local, remote, kv_device, expected)
    (make_caps("a"), make_caps("a"), "cpu", "shm"),
    (make_caps("a"), make_caps("b"), "cpu", "tcp"),
    (A8, make_caps("a", 8), "cpu", "shm"),  # CPU tensors never use a GPU transport
    (make_caps("a", address="10.0.0.1"), make_caps("a2", address="10.0.0.1"), "cpu", "shm"),
    (A8, make_caps("a", 8), "cuda", "cuda_ipc"),
    (make_caps("a", 8, address="10.0.0.1"), make_caps("a-alias", 8, address="10.0.0.1"),
     "cuda", "cuda_ipc"),
    (A8, make_caps("a"), "cuda", "tcp"),  # peer reports no GPU
    (make_caps("a"), make_caps("b", 8, rdma="ACTIVE/InfiniBand"), "cuda", "tcp"),
    (make_caps("a", 8, rdma="ACTIVE/InfiniBand"), make_caps("b", 8, rdma="ACTIVE/InfiniBand"),
     "cuda", "nccl"),
    (make_caps("a", 8, rdma="ACTIVE/Ethernet"), make_caps("b", 8, rdma="ACTIVE/InfiniBand"),
     "cuda", "nccl"),  # RoCE on one side
    (make_caps("a", 8, rdma="DOWN/InfiniBand"), make_caps("b", 8, rdma="ACTIVE/InfiniBand"),
     "cuda", "tcp"),
    (make_caps("a", 8, rdma="INIT/InfiniBand"), make_caps("b", 8, rdma="INIT/InfiniBand"),
     "cuda", "tcp"),
    (make_caps("a", 8, rdma="ACTIVE/InfiniBand"), make_caps("b", 8), "cuda", "tcp"),
    (make_caps("a", 8, nvlink=True), make_caps("b", 8, nvlink=True), "cuda", "nccl"),
    (make_caps("a", 8, nvlink=True), make_caps("b", 8), "cuda", "tcp"),
    (make_caps("a", 8), make_caps("b", 8), "cuda", "tcp"),
    (make_caps("a", 8, nvlink=True, address="10.0.0.1"),
     make_caps("b", 8, nvlink=True, address="10.0.0.2"), "cuda", "nccl"),
]


@pytest.mark.parametrize(("local", "remote", "kv_device", "expected"), CASES)
def test_choice(local: Capabilities, remote: Capabilities, kv_device: str,
                expected: str) -> None:
    assert choose_transport(local, remote, kv_device).name == expected
    assert choose_transport(remote, local, kv_device).name == expected  # symmetric
    assert expected in available_transports()


def test_bad_device() -> None:
    with pytest.raises(ValueError, match="kv_device"):
        choose_transport(A8, A8, "rocm")
