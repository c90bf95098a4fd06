"""The GPU transports' host-side logic, run on CPU: bounded steps (`spans`, `blocks_per_step`,
`GpuKV.copy_from`, `GpuKV.shaped`, multi-step `StagedKV`), stream waits (`poll_event`,
`StepWindow` with fake events), NCCL pair setup with a deadline (`Inits`), the unique id for
both cupy APIs, the control-connection check, and the CUDA IPC mapping cache (`Mappings`)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest
import torch

from meshd.kv_transfer.cuda_ipc import Mappings, share_key
from meshd.kv_transfer.gpu_blocks import GpuKV, spans
from meshd.kv_transfer.layout import BlockLayout
from meshd.kv_transfer.memory import StagedKV
from meshd.kv_transfer.nccl_pair import Inits, cupy_uid, peer_check, uid_from_bytes, uid_to_bytes
from meshd.kv_transfer.streams import StepWindow, poll_event
from meshd.kv_transfer.testing import make_kv
from meshd.kv_transfer.transport import Deadline, ErrorCode, KVTransferFailure, Peer

LAYOUT = BlockLayout(num_layers=3, num_kv_heads=2, head_dim=8, dtype="bfloat16", block_size=4)
PER_LAYER = LAYOUT.bytes_per_block_per_layer


def vllm_views(num_blocks: int, seed: int | None) -> list[torch.Tensor]:
    """Strided per-layer [B, H, N, C] views of one [B, L, H, N, C] buffer (vLLM's BLHNC)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    shape = (num_blocks, LAYOUT.num_layers, LAYOUT.num_kv_heads, LAYOUT.block_size,
             2 * LAYOUT.head_dim)
    backing = (torch.randn(shape, generator=gen) if gen is not None
               else torch.zeros(shape)).to(torch.bfloat16)
    return [backing[:, i] for i in range(LAYOUT.num_layers)]


def kv_of(views: str, num_blocks: int, seed: int | None) -> list[torch.Tensor]:
    return make_kv(LAYOUT, num_blocks, seed) if views == "engine" else vllm_views(num_blocks,
                                                                                 seed)


def test_spans_cover_the_range_in_bounded_steps() -> None:
    assert spans(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert spans(6, 3) == [(0, 3), (3, 6)]
    assert spans(0, 3) == []
    assert spans(2, 10) == [(0, 2)]
    with pytest.raises(ValueError, match="step"):
        spans(3, 0)


def test_blocks_per_step_is_bounded_by_the_budget_and_at_least_one() -> None:
    kv = GpuKV(make_kv(LAYOUT, 4, None), LAYOUT, "engine", device_type="cpu")
    assert kv.blocks_per_step(10 * LAYOUT.bytes_per_block) == 10
    assert kv.blocks_per_step(10 * LAYOUT.bytes_per_block - 1) == 9
    assert kv.blocks_per_step(1) == 1  # a block larger than the budget still moves
    assert kv.blocks_per_step(10 * PER_LAYER, layers=1) == 10


@pytest.mark.parametrize("views", ["engine", "vllm"])
@pytest.mark.parametrize("chunk_bytes", [1, 2 * PER_LAYER, 1 << 30])
def test_copy_from_moves_exactly_the_named_blocks(views: str, chunk_bytes: int) -> None:
    """What CUDA IPC does with the peer's mapped tensors, in steps of `chunk_bytes`."""
    remote = kv_of(views, 12, seed=1)
    local = kv_of(views, 8, seed=None)  # the peer's block count is its own
    kv = GpuKV(local, LAYOUT, views, device_type="cpu")
    remote_ids, local_ids = [11, 0, 5, 6, 2], [7, 1, 3, 0, 4]
    kv.copy_from(remote, remote_ids, local_ids, chunk_bytes)
    dim = kv.block_dim
    for mine, theirs in zip(local, remote, strict=True):
        assert torch.equal(mine.index_select(dim, torch.tensor(local_ids)).view(torch.int16),
                           theirs.index_select(dim, torch.tensor(remote_ids)).view(torch.int16))
        assert not mine.index_select(dim, torch.tensor([2, 5, 6])).any()
    with pytest.raises(ValueError, match="remote ids"):
        kv.copy_from(remote, [1, 2], [3], chunk_bytes)


@pytest.mark.parametrize("views", ["engine", "vllm"])
def test_staged_kv_in_small_steps_equals_one_step(views: str) -> None:
    """Staging in one-block steps gives the same stream, and writes the same blocks, as one
    step (the device memory a GPU transfer uses no longer grows with the prompt)."""
    src = kv_of(views, 10, seed=2)
    ids = [9, 2, 4, 7, 0]
    whole = StagedKV(src, LAYOUT, views)
    stepped = StagedKV(src, LAYOUT, views, chunk_bytes=1)
    deadline = Deadline(5.0, "test")
    stream = b"".join(bytes(v) for v in whole.read(ids, deadline))
    assert b"".join(bytes(v) for v in stepped.read(ids, deadline)) == stream
    assert len(stream) == whole.stream_bytes(len(ids))

    dst = kv_of(views, 10, seed=None)
    staged = StagedKV(dst, LAYOUT, views, chunk_bytes=2 * LAYOUT.bytes_per_block)  # 2 per step
    segments, commit = staged.write([1, 3, 5, 6, 8])
    offset = 0
    for seg in segments:
        seg[:] = stream[offset:offset + len(seg)]
        offset += len(seg)
    commit(deadline)
    dim = 1 if views == "engine" else 0
    for mine, theirs in zip(dst, src, strict=True):
        assert torch.equal(mine.index_select(dim, torch.tensor([1, 3, 5, 6, 8])).view(torch.int16),
                           theirs.index_select(dim, torch.tensor(ids)).view(torch.int16))
        assert not mine.index_select(dim, torch.tensor([0, 2, 4, 7, 9])).any()


# --- NCCL pair setup with a deadline -------------------------------------------------------

def soon(seconds: float) -> float:
    return time.monotonic() + seconds


def test_inits_returns_the_setup_or_its_error() -> None:
    inits = Inits()
    assert inits.run(lambda: 42, soon(5), "setup", lambda _: None) == 42

    def broken() -> int:
        raise RuntimeError("NCCL error: unhandled system error")

    with pytest.raises(RuntimeError, match="unhandled system error"):
        inits.run(broken, soon(5), "setup", lambda _: None)
    assert inits.stuck == 0


def test_inits_gives_up_at_the_deadline_and_closes_a_late_setup() -> None:
    """A peer that never joins costs the caller its deadline, not a hang; if the setup finishes
    later, it is closed; while blocked it counts as stuck."""
    inits = Inits()
    release = threading.Event()
    closed: list[str] = []
    closed_event = threading.Event()

    def on_late(value: str) -> None:
        closed.append(value)
        closed_event.set()

    started = time.monotonic()
    with pytest.raises(KVTransferFailure) as info:
        inits.run(lambda: release.wait(10) and "comm", soon(0.2), "nccl pair setup", on_late)
    assert info.value.error.code is ErrorCode.TIMEOUT and "did not join" in info.value.error.message
    assert time.monotonic() - started < 2.0
    assert inits.stuck == 1
    release.set()
    assert closed_event.wait(5) and closed == ["comm"]
    assert inits.stuck == 0


def test_inits_stops_waiting_when_the_check_fails() -> None:
    """The peer gave up (closed the control connection): fail now, not at the deadline."""
    inits = Inits()
    release = threading.Event()

    def gone() -> None:
        raise KVTransferFailure(ErrorCode.PEER_ERROR, "peer closed the control connection")

    started = time.monotonic()
    with pytest.raises(KVTransferFailure, match="peer closed"):
        inits.run(lambda: release.wait(10), soon(30), "setup", lambda _: None, gone)
    assert time.monotonic() - started < 2.0
    assert inits.stuck == 1
    release.set()


def test_inits_refuses_new_setups_while_too_many_are_stuck() -> None:
    """Both sides call `check` before telling the peer to join, so a refusal never leaves the
    peer joining alone."""
    inits = Inits(max_stuck=2)
    release = threading.Event()
    for _ in range(2):
        inits.check("setup")
        with pytest.raises(KVTransferFailure):
            inits.run(lambda: release.wait(10), soon(0.05), "setup", lambda _: None)
    assert inits.stuck == 2
    with pytest.raises(KVTransferFailure) as info:
        inits.check("nccl pair setup")
    assert info.value.error.code is ErrorCode.PEER_ERROR
    assert "still blocked" in info.value.error.message
    release.set()
    deadline = soon(5)
    while inits.stuck and time.monotonic() < deadline:
        time.sleep(0.01)
    inits.check("setup")
    assert inits.run(lambda: 1, soon(5), "setup", lambda _: None) == 1


# --- CUDA IPC mappings ------------------------------------------------------------------------

def share(handle: bytes, offset: int = 0, tensor_offset: int = 0) -> dict[str, Any]:
    return {"handle": handle, "offset_bytes": offset, "tensor_offset": tensor_offset,
            "shape": [4, 2, 4, 16], "stride": [128, 64, 16, 1]}


class Opener:
    def __init__(self) -> None:
        self.opened: list[tuple[Any, ...]] = []

    def __call__(self, s: dict[str, Any]) -> object:
        self.opened.append(share_key(s))
        return object()


def test_mappings_reuse_a_peers_shares_and_map_each_view_once() -> None:
    opener = Opener()
    cache = Mappings(opener)
    p = Peer("127.0.0.1", 1)
    # three layers: two views into one allocation segment (one handle), one elsewhere
    shares = [share(b"h1", 0, 0), share(b"h1", 0, 512), share(b"h2")]
    first = cache.get(p, shares)
    assert len(opener.opened) == 3 and first[0] is not first[1]
    assert cache.get(p, shares) == first and len(opener.opened) == 3  # reused, not remapped
    # the same view twice in one share list is mapped once
    twice = cache.get(Peer("127.0.0.1", 2), [share(b"h3"), share(b"h3")])
    assert twice[0] is twice[1]


def test_mappings_replace_a_restarted_peers_and_stay_bounded() -> None:
    opener = Opener()
    cache = Mappings(opener, max_peers=2)
    p = Peer("127.0.0.1", 1)
    old = cache.get(p, [share(b"h1")])
    new = cache.get(p, [share(b"h9")])  # the prefill restarted: new handles, old ones dropped
    assert new != old and cache.peers() == 1
    cache.get(Peer("127.0.0.1", 2), [share(b"h2")])
    cache.get(p, [share(b"h9")])  # p is now the most recently used
    cache.get(Peer("127.0.0.1", 3), [share(b"h3")])  # evicts peer 2
    assert cache.peers() == 2
    n = len(opener.opened)
    cache.get(p, [share(b"h9")])
    assert len(opener.opened) == n  # p kept
    cache.get(Peer("127.0.0.1", 2), [share(b"h2")])
    assert len(opener.opened) == n + 1  # peer 2 was dropped, so it is mapped again
    cache.clear()
    assert cache.peers() == 0


# --- stream discipline and NCCL helpers (host side) --------------------------------------------

class FakeEvent:
    """An event that completes after `polls` queries."""

    def __init__(self, polls: int = 0) -> None:
        self.polls = polls
        self.recorded_on: object = None

    def query(self) -> bool:
        self.polls -= 1
        return self.polls < 0

    def record(self, stream: object) -> None:
        self.recorded_on = stream


def test_poll_event_times_out_and_runs_the_check() -> None:
    poll_event(FakeEvent(3), soon(5), "copy")
    with pytest.raises(KVTransferFailure) as info:
        poll_event(FakeEvent(10**9), soon(0.05), "nccl receive")
    assert info.value.error.code is ErrorCode.TIMEOUT and "nccl receive" in str(info.value)

    def failing() -> None:
        raise KVTransferFailure(ErrorCode.PEER_ERROR, "peer closed the control connection")

    started = time.monotonic()
    with pytest.raises(KVTransferFailure, match="peer closed"):
        poll_event(FakeEvent(10**9), soon(30), "nccl receive", failing)
    assert time.monotonic() - started < 1.0  # a failed check ends the wait, not the deadline


def test_step_window_keeps_at_most_depth_steps_queued() -> None:
    made: list[FakeEvent] = []

    def new_event() -> FakeEvent:
        made.append(FakeEvent(2))
        return made[-1]

    window = StepWindow("stream", depth=2, new_event=new_event)
    for _ in range(5):
        window.admit(soon(5), "step")
        window.record()
    assert len(made) == 5 and all(e.recorded_on == "stream" for e in made)
    assert all(e.polls < 0 for e in made[:3])  # waited for before steps 3, 4, 5 were queued
    assert all(e.polls == 2 for e in made[3:])  # the last two are still in flight
    stalled = StepWindow("stream", depth=1, new_event=lambda: FakeEvent(10**9))
    stalled.record()
    with pytest.raises(KVTransferFailure):
        stalled.admit(soon(0.05), "nccl send")


def test_shaped_views_are_dense_prefixes_of_flat_step_buffers() -> None:
    for views in ("engine", "vllm"):
        kv = GpuKV(kv_of(views, 6, seed=3), LAYOUT, views, device_type="cpu")
        flat = [torch.zeros(4 * PER_LAYER, dtype=torch.uint8) for _ in range(LAYOUT.num_layers)]
        bufs = kv.shaped(flat, 3)  # a shorter last step: still one dense prefix
        assert all(b.is_contiguous() and b.data_ptr() == f.data_ptr()
                   for b, f in zip(bufs, flat, strict=True))
        assert bufs[0].shape == kv.block_shape(3) and bufs[0].dtype == torch.bfloat16
        kv.gather([5, 0, 2], out=bufs)
        assert torch.equal(bufs[1].view(torch.int16), kv.gather([5, 0, 2])[1].view(torch.int16))
        assert not flat[1][3 * PER_LAYER:].any()  # nothing written past the prefix


def test_cupy_uid_matches_the_cupy_api() -> None:
    raw = bytes(range(128, 256))
    assert cupy_uid(raw, 14) == raw  # cupy >= 14: bytes in, bytes out
    assert cupy_uid(raw, 13) == uid_from_bytes(raw)  # cupy 13: C chars
    assert uid_to_bytes(raw) == raw  # get_unique_id() of cupy 14 is bytes already
    with pytest.raises(KVTransferFailure):
        cupy_uid(b"short", 14)


def test_peer_check_sees_a_closed_or_talking_peer() -> None:
    a, b = socket.socketpair()
    a.settimeout(5.0)  # as the transports' sockets: a recv would wait for data
    try:
        quiet, strict = peer_check(a, any_data=False), peer_check(a, any_data=True)
        started = time.monotonic()
        quiet()
        strict()  # nothing sent: both pass, at once
        assert time.monotonic() - started < 0.5
        b.sendall(b"x")
        quiet()  # data (e.g. the ack) is fine for the sender's check
        with pytest.raises(KVTransferFailure, match="reported a failure"):
            strict()
        assert a.recv(1) == b"x"  # peeking consumed nothing
        b.close()
        with pytest.raises(KVTransferFailure, match="closed"):
            quiet()
    finally:
        a.close()
