"""GPU transports: CUDA IPC and NCCL move blocks bit for bit (GPU only), plus the CPU-testable
parts (libnccl policy, unique-id encoding, lazy imports)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd.kv_transfer.layout import BlockLayout
from meshd.kv_transfer.nccl_pair import (
    char_is_signed,
    check_single_nccl,
    nccl_libraries,
    uid_from_bytes,
    uid_to_bytes,
)

SERVER = Path(__file__).with_name("kv_server.py")
SECRET = "ab" * 32
LAYOUT = BlockLayout(num_layers=3, num_kv_heads=4, head_dim=64, dtype="bfloat16", block_size=16)
TORCH_LIB = "/venv/lib/python3.11/site-packages/nvidia/nccl/lib/libnccl.so.2"
CUPY_LIB = "/usr/lib/x86_64-linux-gnu/libnccl.so.2.19.3"


def make_maps(*paths: str) -> str:
    return "\n".join(f"7f00-7f10 r-xp 00000000 08:01 42 {p}" for p in paths) + "\n"


@pytest.mark.parametrize(("maps", "expected"), [
    ("", []),
    (make_maps(TORCH_LIB, TORCH_LIB, "/usr/lib/libc.so.6"), [TORCH_LIB]),
    (make_maps(TORCH_LIB, CUPY_LIB), sorted([TORCH_LIB, CUPY_LIB])),
])
def test_nccl_libraries(maps: str, expected: list[str]) -> None:
    assert nccl_libraries(maps) == expected


@pytest.mark.parametrize(("libs", "problem"), [
    ([TORCH_LIB], None),
    ([], None),
    ([TORCH_LIB, CUPY_LIB], "2 libnccl copies are loaded"),
])
def test_one_libnccl_policy(libs: list[str], problem: str | None) -> None:
    got = check_single_nccl(libs)
    assert (got is None) if problem is None else (got is not None and problem in got)


def test_nccl_plugins_are_not_copies() -> None:
    """NCCL's network/tuner plugins (HPC-X SHARP, AWS OFI) are mapped beside the core library
    on InfiniBand hosts; they must not count as a second libnccl."""
    maps = make_maps(TORCH_LIB, "/opt/hpcx/nccl_rdma_sharp_plugin/lib/libnccl-net.so.0",
                     "/usr/lib/libnccl-tuner.so")
    assert nccl_libraries(maps) == [TORCH_LIB]


def test_unique_id_round_trip() -> None:
    signed = tuple(range(-64, 64))  # cupy's C chars on x86_64
    unsigned = tuple(v & 0xFF for v in signed)  # the same bytes where char is unsigned
    assert uid_to_bytes(signed) == uid_to_bytes(unsigned) and len(uid_to_bytes(signed)) == 128
    assert uid_from_bytes(uid_to_bytes(signed), signed=True) == signed
    assert uid_from_bytes(uid_to_bytes(unsigned), signed=False) == unsigned
    assert char_is_signed("x86_64") and not char_is_signed("aarch64")
    assert not char_is_signed("ppc64le") and not char_is_signed("s390x")


def test_modules_import_without_cupy() -> None:
    code = ("import sys, meshd.kv_transfer.nccl, meshd.kv_transfer.cuda_ipc; "
            "assert 'cupy' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


# --- on a GPU -------------------------------------------------------------------------------

@pytest.fixture
def kv_server(request: pytest.FixtureRequest) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    import torch

    transport, visible, views = request.param
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    if transport == "nccl":
        pytest.importorskip("cupy")  # before the server process starts (it would die)
    if torch.cuda.device_count() < len(visible.split(",")):
        pytest.skip(f"{transport} test needs {len(visible.split(','))} GPUs")
    args = {"transport": transport, "views": views, "layout": LAYOUT.to_dict(),
            "num_blocks": 32, "seed": 1, "secret": SECRET,
            "held": {"r1": [3, 1, 7, 8], "r2": [9, 4]}}
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible}
    proc = subprocess.Popen([sys.executable, str(SERVER), json.dumps(args)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("PORT"), line
        yield int(line.split()[1]), proc
    finally:
        proc.kill()
        proc.wait()


# small steps, so a 4-block fetch moves in several (one block per step on this layout)
STEP_OPTIONS = {"nccl": {"chunk_bytes": 64 << 10}, "cuda_ipc": {"chunk_bytes": 20_000}}


def fetch_and_compare(transport: str, views: str, port: int,
                      proc: subprocess.Popen[str]) -> None:
    import torch

    from meshd.kv_transfer.auth import SharedSecretAuthenticator
    from meshd.kv_transfer.transport import Peer, make_client

    sys.path.insert(0, str(SERVER.parent))
    from kv_server import make_gpu_kv

    expected = make_gpu_kv(LAYOUT, 32, 1, views)
    local = make_gpu_kv(LAYOUT, 32, None, views)
    dim = 1 if views == "engine" else 0
    client = make_client(transport, local, LAYOUT,
                         SharedSecretAuthenticator(bytes.fromhex(SECRET), "client"), views=views,
                         **STEP_OPTIONS.get(transport, {}))
    try:
        # the second fetch reuses what the first set up (NCCL pair, IPC mappings)
        for rid, remote_ids, local_ids in [("r1", [3, 1, 7, 8], [0, 5, 2, 3]),
                                           ("r2", [9, 4], [6, 7])]:
            res = client.fetch(Peer("127.0.0.1", port), rid, remote_ids, local_ids, 60.0)
            assert res.ok, res.error
            assert res.bytes == len(local_ids) * LAYOUT.bytes_per_block
            assert proc.stdout is not None and proc.stdout.readline().split() == ["SENT", rid]
        fetched = [0, 5, 2, 3, 6, 7]
        for mine, theirs in zip(local, expected, strict=True):
            got = mine.index_select(dim, torch.tensor(fetched, device="cuda"))
            want = theirs.index_select(dim, torch.tensor([3, 1, 7, 8, 9, 4], device="cuda"))
            assert torch.equal(got.view(torch.int16), want.view(torch.int16))  # bit for bit
            untouched = torch.tensor([b for b in range(32) if b not in fetched], device="cuda")
            assert not mine.index_select(dim, untouched).any()
    finally:
        client.close()


@pytest.mark.gpu
@pytest.mark.parametrize("kv_server", [("cuda_ipc", "0", "engine"), ("cuda_ipc", "0", "vllm")],
                         indirect=True, ids=["engine", "vllm"])
def test_cuda_ipc_bit_for_bit(kv_server: tuple[int, subprocess.Popen[str]],
                              request: pytest.FixtureRequest) -> None:
    fetch_and_compare("cuda_ipc", request.node.callspec.id, *kv_server)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_server", [("tcp", "0", "engine"), ("tcp", "0", "vllm")],
                         indirect=True, ids=["engine", "vllm"])
def test_tcp_staged_through_host_bit_for_bit(kv_server: tuple[int, subprocess.Popen[str]],
                                             request: pytest.FixtureRequest) -> None:
    """CUDA KV over TCP: both sides stage through pinned host buffers (the cross-host fallback
    without an NCCL fabric)."""
    fetch_and_compare("tcp", request.node.callspec.id, *kv_server)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_server", [("nccl", "1,0", "engine"), ("nccl", "1,0", "vllm")],
                         indirect=True, ids=["engine", "vllm"])
def test_nccl_bit_for_bit(kv_server: tuple[int, subprocess.Popen[str]],
                          request: pytest.FixtureRequest) -> None:
    # NCCL needs two GPUs: it refuses two ranks on one GPU (the fixture skips otherwise)
    fetch_and_compare("nccl", request.node.callspec.id, *kv_server)


@pytest.mark.gpu
def test_cuda_ipc_refuses_a_peer_with_other_block_dims() -> None:
    """A share whose per-block dims differ from ours is refused before anything is mapped."""
    import torch

    from meshd.kv_transfer.cuda_ipc import check_share, export_share
    from meshd.kv_transfer.gpu_blocks import GpuKV
    from meshd.kv_transfer.transport import KVTransferFailure

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    sys.path.insert(0, str(SERVER.parent))
    from kv_server import make_gpu_kv

    kv = GpuKV(make_gpu_kv(LAYOUT, 8, None, "vllm"), LAYOUT, "vllm")
    share = export_share(kv.layers[0])
    assert check_share(share, kv) is share
    with pytest.raises(KVTransferFailure, match="does not match"):
        check_share({**share, "shape": [8, LAYOUT.block_size, LAYOUT.num_kv_heads, 128]}, kv)
    with pytest.raises(KVTransferFailure, match="exceeds its storage"):
        check_share({**share, "shape": [10**6, *share["shape"][1:]]}, kv)
