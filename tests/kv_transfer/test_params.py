"""kv_transfer_params shared by the embedded engine and the vLLM connector: what prefill emits,
what decode accepts, and the (metric label) reasons it refuses."""

from __future__ import annotations

from typing import Any

import pytest

from meshd.kv_transfer.params import ParamsError, RemotePrefill, prefill_params, prompt_digest
from meshd.kv_transfer.transport import Peer

PROMPT = (5, 6, 7, 8, 9)
ALL = ("tcp", "shm")


def make_params(**change: Any) -> dict[str, Any]:
    params = prefill_params(request_id="cmpl-1-0-abcd1234", block_ids=[7, 3, 9], engine_id="p0",
                            peer=Peer("10.0.0.1", 23456), transport="shm", num_tokens=80,
                            prompt=PROMPT)
    return {**params, **change}


def test_prefill_params_round_trip() -> None:
    params = make_params()
    assert params == {
        "do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "p0",
        "remote_block_ids": [7, 3, 9], "remote_request_id": "cmpl-1-0-abcd1234",
        "remote_host": "10.0.0.1", "remote_port": 23456, "tp_size": 1, "remote_num_tokens": 80,
        "meshd_transport": "shm", "meshd_prompt_digest": prompt_digest(PROMPT)}
    remote = RemotePrefill.parse(params, allowed_transports=ALL)
    assert remote == RemotePrefill(Peer("10.0.0.1", 23456), "cmpl-1-0-abcd1234", (7, 3, 9),
                                   "p0", 1, "shm", 80, prompt_digest(PROMPT))
    assert isinstance(remote, RemotePrefill) and remote.matches(PROMPT)
    assert not remote.matches((5, 6, 7, 8))


def test_optional_fields_and_defaults() -> None:
    """A plain NixlConnector dict (no meshd keys) parses; the transport defaults."""
    nixl = {k: v for k, v in make_params().items()
            if k not in ("remote_num_tokens", "meshd_transport", "meshd_prompt_digest",
                         "tp_size")}
    remote = RemotePrefill.parse(nixl, allowed_transports=ALL, default_transport="shm")
    assert isinstance(remote, RemotePrefill)
    assert (remote.transport, remote.tp_size, remote.num_tokens, remote.prompt_digest) == (
        "shm", 1, None, None)
    assert remote.matches((1, 2, 3))  # no digest: any prompt
    assert isinstance(RemotePrefill.parse(nixl, allowed_transports=ALL), RemotePrefill)
    assert RemotePrefill.parse(nixl, allowed_transports=("shm",)) == "unsupported_transport"


def test_hma_nested_block_list() -> None:
    nested = RemotePrefill.parse(make_params(remote_block_ids=[[7, 3, 9]]),
                                 allowed_transports=ALL)
    assert isinstance(nested, RemotePrefill) and nested.block_ids == (7, 3, 9)
    two_groups = make_params(remote_block_ids=[[7], [3]])
    assert RemotePrefill.parse(two_groups, allowed_transports=ALL) == "bad_block_ids"


@pytest.mark.parametrize(("params", "reason"), [
    (None, "not_remote_prefill"),
    ({}, "not_remote_prefill"),
    (make_params(do_remote_prefill=False, do_remote_decode=True), "not_remote_prefill"),
    (make_params(remote_host=None), "bad_peer"),
    (make_params(remote_host=""), "bad_peer"),
    (make_params(remote_port="23456"), "bad_peer"),
    (make_params(remote_port=True), "bad_peer"),
    (make_params(remote_port=0), "bad_peer"),
    (make_params(remote_port=65536), "bad_peer"),
    (make_params(remote_request_id=""), "bad_request_id"),
    (make_params(remote_request_id=7), "bad_request_id"),
    (make_params(remote_block_ids=[]), "bad_block_ids"),
    (make_params(remote_block_ids=None), "bad_block_ids"),
    (make_params(remote_block_ids=[1, -2]), "bad_block_ids"),
    (make_params(remote_block_ids=[1, 2.0]), "bad_block_ids"),
    (make_params(remote_block_ids=[1, True]), "bad_block_ids"),
    (make_params(tp_size=0), "bad_tp_size"),
    (make_params(tp_size="1"), "bad_tp_size"),
    (make_params(remote_num_tokens=-1), "bad_num_tokens"),
    (make_params(meshd_prompt_digest=123), "bad_prompt_digest"),
    (make_params(meshd_transport="nccl"), "unsupported_transport"),
    (make_params(meshd_transport=None), "unsupported_transport"),
    (make_params(meshd_transports="tcp"), "bad_transports"),
    (make_params(meshd_transports=["tcp", 3]), "bad_transports"),
    (make_params(meshd_host=["a"]), "bad_host"),
])
def test_parse_reasons(params: dict[str, Any] | None, reason: str) -> None:
    got = RemotePrefill.parse(params, allowed_transports=ALL)
    assert isinstance(got, ParamsError) and got.value == reason  # a typed reason, stable value


def test_prompt_digest_is_stable() -> None:
    assert prompt_digest(PROMPT) == prompt_digest(list(PROMPT))
    assert len(prompt_digest(PROMPT)) == 32 and prompt_digest(PROMPT) != prompt_digest(())
    no_prompt = prefill_params(request_id="r", block_ids=[1], engine_id="p", peer=Peer("h", 1),
                               transport="tcp", num_tokens=3)
    assert "meshd_prompt_digest" not in no_prompt


def test_several_transports_and_host_facts() -> None:
    """A prefill side serving several transports on one port lists them and its host facts;
    names this side does not know are dropped."""
    params = prefill_params(request_id="r", block_ids=[1], engine_id="p", peer=Peer("h", 1),
                            transport="tcp", num_tokens=4, offered=["tcp", "shm", "rdma"],
                            host={"hostname": "h", "rdma": False})
    assert params["meshd_transports"] == ["tcp", "shm", "rdma"]
    remote = RemotePrefill.parse(params, allowed_transports=ALL)
    assert isinstance(remote, RemotePrefill)
    assert remote.transports() == ("tcp", "shm") and remote.host == {"hostname": "h",
                                                                       "rdma": False}
    single = RemotePrefill.parse(make_params(), allowed_transports=ALL)
    assert isinstance(single, RemotePrefill)
    assert single.transports() == ("shm",) and single.host is None
