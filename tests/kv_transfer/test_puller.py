"""The shared decode-side pull (`puller.py`): one client per transport, typed outcomes for every
failure mode, the pool, and close. Real servers and clients over loopback."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from meshd.kv_transfer.auth import SharedSecretAuthenticator
from meshd.kv_transfer.layout import BlockLayout
from meshd.kv_transfer.puller import (
    NOTHING_MOVED,
    KVPuller,
    PullFailure,
    PullOutcome,
    Unavailable,
)
from meshd.kv_transfer.testing import DictSource, make_kv
from meshd.kv_transfer.transport import (
    ErrorCode,
    KVViews,
    Peer,
    TransferError,
    TransferResult,
    make_server,
)

LAYOUT = BlockLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", block_size=4)
AUTH = SharedSecretAuthenticator(b"m" * 32, "t")
HELD = {"r1": [1, 2], "r2": [3, 5], "r3": [6]}


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[list[torch.Tensor], Peer]]:
    src = make_kv(LAYOUT, 8, seed=3)
    server = make_server("tcp", src, LAYOUT, AUTH, DictSource(HELD))
    try:
        yield src, server.address
    finally:
        server.close()


def make_puller(timeout_s: float = 5.0, auth: SharedSecretAuthenticator = AUTH
                ) -> tuple[KVPuller, list[torch.Tensor]]:
    dst = make_kv(LAYOUT, 8, None)
    return KVPuller(KVViews(dst, LAYOUT), auth, timeout_s), dst


def test_pull_copies_the_blocks_and_reuses_the_client(
        served: tuple[list[torch.Tensor], Peer]) -> None:
    src, peer = served
    puller, dst = make_puller()
    try:
        out = puller.fetch("tcp", peer, "r1", [1, 2], [4, 0])
        assert out.ok and out.reason is None and out.via == "tcp", out
        assert out.result.bytes == 2 * LAYOUT.bytes_per_block and out.describe() == "ok"
        for mine, theirs in zip(dst, src, strict=True):
            assert torch.equal(mine[:, [4, 0]], theirs[:, [1, 2]])
        assert puller.client("tcp") is puller.client("tcp")  # built once, cached
        pooled = puller.submit("tcp", peer, "r2", [3, 5], [1, 2]).result(10)
        assert pooled.ok, pooled
    finally:
        puller.close()


def stalled_peer() -> socket.socket:
    """Listens (the kernel completes connects) but never answers the handshake."""
    return socket.create_server(("127.0.0.1", 0))


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])


# Each failure mode -> the outcome's reason. `peer` None: the shared server.
@pytest.mark.parametrize(("case", "transport", "rid", "remote", "local", "reason"), [
    ("unknown request", "tcp", "nobody", [1], [0], ErrorCode.UNKNOWN_REQUEST),
    ("blocks not held", "tcp", "r3", [7], [0], ErrorCode.BAD_BLOCKS),
    ("count mismatch", "tcp", "r3", [6], [0, 1], ErrorCode.BAD_BLOCKS),
    ("wrong secret", "tcp", "r3", [6], [0], ErrorCode.AUTH),
    ("nothing listening", "tcp", "r3", [6], [0], ErrorCode.CONNECT),
    ("peer stalls", "tcp", "r3", [6], [0], ErrorCode.TIMEOUT),
    ("caller bug", "tcp", "r3", [6], ["zero"], ErrorCode.INTERNAL),
    ("cuda_ipc on CPU KV", "cuda_ipc", "r3", [6], [0], PullFailure.TRANSPORT_UNAVAILABLE),
    ("nccl on CPU KV", "nccl", "r3", [6], [0], PullFailure.TRANSPORT_UNAVAILABLE),
    ("unknown transport", "carrier-pigeon", "r3", [6], [0], PullFailure.TRANSPORT_UNAVAILABLE),
])
def test_failure_modes_have_typed_reasons(served: tuple[list[torch.Tensor], Peer], case: str,
                                          transport: str, rid: str, remote: list[int],
                                          local: list[Any], reason: object) -> None:
    _, peer = served
    stall = stalled_peer() if case == "peer stalls" else None
    if stall is not None:
        peer = Peer("127.0.0.1", stall.getsockname()[1])
    elif case == "nothing listening":
        peer = Peer("127.0.0.1", closed_port())
    auth = SharedSecretAuthenticator(b"x" * 32, "t") if case == "wrong secret" else AUTH
    puller, dst = make_puller(timeout_s=0.5, auth=auth)
    try:
        out = puller.fetch(transport, peer, rid, remote, local)
    finally:
        puller.close()
        if stall is not None:
            stall.close()
    assert not out.ok and out.reason == reason and type(out.reason) is type(reason), out
    assert out.describe().startswith(f"{out.reason.value}: ") and out.detail
    assert not any(t.any() for t in dst), "a failed pull before any payload writes nothing"
    if isinstance(reason, PullFailure):
        assert out.result == NOTHING_MOVED and out.via == ""


def test_an_unavailable_transport_is_remembered() -> None:
    puller, _ = make_puller()
    try:
        first = puller.client("cuda_ipc")
        assert isinstance(first, Unavailable) and first.transport == "cuda_ipc"
        assert "cuda" in first.message
        assert puller.client("cuda_ipc") is first  # not rebuilt per request
        out = puller.fetch("cuda_ipc", Peer("127.0.0.1", 9), "r", [1], [1])
        assert out.reason is PullFailure.TRANSPORT_UNAVAILABLE
        assert out.detail == f"cuda_ipc: {first.message}"
    finally:
        puller.close()


def make_vllm_views(num_blocks: int, seed: int | None = None) -> list[torch.Tensor]:
    """Like vLLM's CPU backend: per-layer `[B, H, N, C]` bf16 views into one int8 buffer."""
    buf = torch.zeros(2 * num_blocks * 2 * 4 * 32, dtype=torch.int16)
    if seed is not None:
        buf.random_(generator=torch.Generator().manual_seed(seed))
    layers = buf.view(torch.bfloat16).view(2, num_blocks, 2, 4, 32)
    return [layers[0], layers[1]]


def test_vllm_views_pull_under_their_wire_name() -> None:
    from meshd.kv_transfer.vllm_layout import layout_of

    src, dst = make_vllm_views(8, seed=2), make_vllm_views(8)
    layout = layout_of(src, 2, 16, 4)
    server = make_server("tcp", src, layout, AUTH, DictSource({"v": [2, 3]}), views="vllm")
    puller = KVPuller(KVViews(dst, layout, "vllm"), AUTH, 5.0)
    try:
        out = puller.fetch("tcp", server.address, "v", [2, 3], [0, 1])
        assert out.ok and out.via == "tcp+vllm-BHNC", out
        for s, d in zip(src, dst, strict=True):
            assert torch.equal(d.view(torch.int16)[[0, 1]], s.view(torch.int16)[[2, 3]])
    finally:
        puller.close()
        server.close()


@pytest.mark.parametrize(("result", "reason", "detail"), [
    (TransferResult(True, 10, 0.1), None, ""),
    (TransferResult(False, 3, 0.1, TransferError(ErrorCode.CORRUPT, "crc")), ErrorCode.CORRUPT,
     "crc"),
    (TransferResult(False, 0, 0.0), ErrorCode.INTERNAL, "failed without an error"),
])
def test_outcome_of_a_result(result: TransferResult, reason: ErrorCode | None,
                             detail: str) -> None:
    out = PullOutcome.of(result, "tcp")
    assert (out.reason, out.result, out.via, out.detail) == (reason, result, "tcp", detail)


def test_close_cancels_pending_pulls_and_refuses_new_clients(
        served: tuple[list[torch.Tensor], Peer]) -> None:
    _, peer = served
    stall = stalled_peer()
    dst = make_kv(LAYOUT, 8, None)
    puller = KVPuller(KVViews(dst, LAYOUT), AUTH, 1.0, threads=1)
    try:
        busy = puller.submit("tcp", Peer("127.0.0.1", stall.getsockname()[1]), "r3", [6], [0])
        deadline = time.monotonic() + 5.0
        while not busy.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        queued = puller.submit("tcp", peer, "r3", [6], [1])  # waits: the one thread is busy
        puller.close()
        assert queued.cancelled()
        assert busy.result(5).reason == ErrorCode.TIMEOUT  # the running one ends on its deadline
        assert isinstance(puller.client("tcp"), Unavailable)
        with pytest.raises(RuntimeError):
            puller.submit("tcp", peer, "r3", [6], [1])
    finally:
        stall.close()


def test_views_kind_and_timeout_are_checked() -> None:
    with pytest.raises(ValueError, match="kind"):
        KVViews([], LAYOUT, "sglang")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout_s"):
        KVPuller(KVViews([], LAYOUT), AUTH, 0.0)
