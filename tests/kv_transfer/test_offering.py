"""The shared prefill-side setup (`offering.py`): what a prefill side offers, the params it
answers with, and the one server for the offer, pulled from with the shared puller."""

from __future__ import annotations

import time

import pytest
import torch

from meshd.kv_transfer.auth import SharedSecretAuthenticator
from meshd.kv_transfer.layout import BlockLayout
from meshd.kv_transfer.offering import KVOffer, make_offer, serve_kv
from meshd.kv_transfer.params import RemotePrefill
from meshd.kv_transfer.puller import KVPuller
from meshd.kv_transfer.select import HostFacts
from meshd.kv_transfer.testing import DictSource, make_kv
from meshd.kv_transfer.transport import KVViews, Peer

LAYOUT = BlockLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", block_size=4)
AUTH = SharedSecretAuthenticator(b"m" * 32, "t")
HERE = HostFacts("p-host", "10.0.0.1")
ANY = Peer("127.0.0.1", 0)


@pytest.mark.parametrize(("transport", "kv_device", "served", "several"), [
    ("tcp", "cpu", ("tcp",), False),
    ("shm", "cpu", ("shm",), False),
    ("auto", "cpu", ("tcp", "shm"), True),
    ("auto", "cuda", ("tcp", "cuda_ipc"), True),  # no RDMA/NVLink here: no nccl
    ("nccl", "cuda", ("nccl",), False),
])
def test_offer(transport: str, kv_device: str, served: tuple[str, ...], several: bool) -> None:
    kv = make_offer(transport, kv_device, HERE)
    assert (kv.transports, kv.default) == (served, served[0])
    assert kv.offered == (served if several else ())
    assert kv.host == (HERE.to_dict() if several else None)


def test_offer_params_round_trip() -> None:
    prompt = [3, 1, 4, 1, 5]
    for kv in (make_offer("shm", "cpu", HERE), make_offer("auto", "cpu", HERE)):
        params = kv.params(request_id="p-1", block_ids=[4, 2], engine_id="p",
                           peer=Peer("10.0.0.1", 4000), num_tokens=5, prompt=prompt, tp_size=2)
        remote = RemotePrefill.parse(params, allowed_transports=("tcp", "shm"))
        assert isinstance(remote, RemotePrefill)
        assert (remote.request_id, remote.block_ids, remote.peer, remote.tp_size) == (
            "p-1", (4, 2), Peer("10.0.0.1", 4000), 2)
        assert remote.transport == kv.default and remote.transports() == kv.transports
        assert remote.matches(prompt) and remote.host == kv.host
    with pytest.raises(ValueError, match="at least one"):
        KVOffer((), HERE)


def test_auto_serves_every_transport_on_one_port() -> None:
    src = make_kv(LAYOUT, 8, seed=5)
    source = DictSource({"a": [1, 2], "b": [6]})
    serving = serve_kv(make_offer("auto", "cpu", HERE), KVViews(src, LAYOUT), AUTH, source, ANY)
    puller = KVPuller(KVViews(make_kv(LAYOUT, 8, None), LAYOUT), AUTH, 5.0)
    try:
        assert serving.skipped == {} and serving.server.offered == ["tcp", "shm"]
        peer = serving.peer()
        assert peer == serving.server.address and serving.peer("10.9.9.9").host == "10.9.9.9"
        for transport, rid, blocks in (("shm", "a", [1, 2]), ("tcp", "b", [6])):
            out = puller.fetch(transport, peer, rid, blocks, list(range(len(blocks))))
            assert out.ok and out.via == transport, out
        deadline = time.monotonic() + 5.0  # the server handles the ack after fetch returned
        while len(source.sent) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(source.sent) == ["a", "b"]
    finally:
        puller.close()
        serving.server.close()


def test_what_cannot_run_here_is_skipped_or_refused() -> None:
    src = make_kv(LAYOUT, 8, seed=5)
    views = KVViews(src, LAYOUT)
    several = KVOffer(("tcp", "cuda_ipc"), HERE)  # what `auto` offers for CUDA KV
    serving = serve_kv(several, views, AUTH, DictSource({}), ANY)
    try:
        assert list(serving.skipped) == ["cuda_ipc"] and serving.server.offered == ["tcp"]
    finally:
        serving.server.close()
    with pytest.raises(ValueError, match="cuda"):
        serve_kv(KVOffer(("cuda_ipc",), HERE), views, AUTH, DictSource({}), ANY)


def test_vllm_views_are_served_under_their_wire_name() -> None:
    from meshd.kv_transfer.vllm_layout import layout_of

    layers = torch.zeros(2, 8, 2, 4, 32, dtype=torch.bfloat16)
    views = KVViews([layers[0], layers[1]], layout_of([layers[0], layers[1]], 2, 16, 4), "vllm")
    serving = serve_kv(make_offer("tcp", "cpu", HERE), views, AUTH, DictSource({}), ANY)
    try:
        assert serving.server.name == "tcp+vllm-BHNC"
    finally:
        serving.server.close()
