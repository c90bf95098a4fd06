"""`kv_transfer_params`: what a prefill response carries and the decode side parses.

Pure (no torch, no vllm), shared by the embedded engine (`node_agent/engine/disagg.py`) and
meshd's vLLM connector (`vllm_connector.py`). The keys are vLLM's NixlConnector proxy protocol
(`do_remote_prefill`, `do_remote_decode`, `remote_engine_id`, `remote_block_ids`,
`remote_request_id`, `remote_host`, `remote_port`, `tp_size`) plus meshd's own
(`remote_num_tokens`, `meshd_transport`, `meshd_prompt_digest`). The proxy passes the dict from
the prefill response to the decode request unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from meshd.kv_transfer.transport import Peer


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def prompt_digest(prompt: Sequence[int]) -> str:
    """Short digest of the prompt's token ids: decode refuses KV computed for another prompt."""
    return hashlib.sha256(b"".join(t.to_bytes(4, "little") for t in prompt)).hexdigest()[:32]


def prefill_params(*, request_id: str, block_ids: Sequence[int], engine_id: str, peer: Peer,
                   transport: str, num_tokens: int, tp_size: int = 1,
                   prompt: Sequence[int] | None = None, offered: Sequence[str] = (),
                   host: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a prefill response returns: vLLM's NixlConnector fields, `remote_num_tokens`,
    `meshd_transport` (the default transport), `meshd_prompt_digest` when `prompt` is given,
    and, from a prefill side serving several transports on one port, `meshd_transports` (all
    of them) and `meshd_host` (its `select.HostFacts`, so the decode side can pick)."""
    out: dict[str, Any] = {
        "do_remote_prefill": True, "do_remote_decode": False,
        "remote_engine_id": engine_id, "remote_block_ids": list(block_ids),
        "remote_request_id": request_id, "remote_host": peer.host, "remote_port": peer.port,
        "tp_size": tp_size, "remote_num_tokens": num_tokens, "meshd_transport": transport,
    }
    if prompt is not None:
        out["meshd_prompt_digest"] = prompt_digest(prompt)
    if offered:
        out["meshd_transports"] = list(offered)
    if host is not None:
        out["meshd_host"] = dict(host)
    return out


class ParamsError(StrEnum):
    """Why `kv_transfer_params` are unusable (`RemotePrefill.parse`). Metric label values."""

    NOT_REMOTE_PREFILL = "not_remote_prefill"
    BAD_PEER = "bad_peer"
    BAD_REQUEST_ID = "bad_request_id"
    BAD_BLOCK_IDS = "bad_block_ids"
    BAD_TP_SIZE = "bad_tp_size"
    BAD_NUM_TOKENS = "bad_num_tokens"
    BAD_PROMPT_DIGEST = "bad_prompt_digest"
    UNSUPPORTED_TRANSPORT = "unsupported_transport"
    BAD_TRANSPORTS = "bad_transports"
    BAD_HOST = "bad_host"


@dataclass(frozen=True, slots=True)
class RemotePrefill:
    """The decode side's view of a prefill response's `kv_transfer_params`."""

    peer: Peer
    request_id: str  # the prefill engine's internal id: what its leases are keyed by
    block_ids: tuple[int, ...]
    engine_id: str = ""
    tp_size: int = 1
    transport: str = "tcp"
    num_tokens: int | None = None  # remote_num_tokens, when sent
    prompt_digest: str | None = None  # meshd_prompt_digest, when sent
    offered: tuple[str, ...] = ()  # meshd_transports we can run (() = just `transport`)
    host: Mapping[str, Any] | None = None  # meshd_host: the prefill side's HostFacts dict

    def transports(self) -> tuple[str, ...]:
        """What the prefill side serves that we could pull over."""
        return self.offered or (self.transport,)

    def matches(self, prompt: Sequence[int]) -> bool:
        """False if the params carry a digest of another prompt (no digest: True)."""
        return self.prompt_digest is None or self.prompt_digest == prompt_digest(prompt)

    @staticmethod
    def parse(params: Mapping[str, Any] | None, *, allowed_transports: Collection[str],
              default_transport: str = "tcp") -> RemotePrefill | ParamsError:
        """The parsed params, or why they are unusable (a `ParamsError`, whose values are
        metric label values: keep them stable):

        - `not_remote_prefill`: no params, or `do_remote_prefill` is not set
        - `bad_peer`: `remote_host` not a non-empty string, or `remote_port` not in 1..65535
        - `bad_request_id`: `remote_request_id` not a non-empty string
        - `bad_block_ids`: `remote_block_ids` not a non-empty list of ints >= 0 (one level of
          HMA-style nesting, `[[...]]` for one KV cache group, is accepted)
        - `bad_tp_size`: `tp_size` (default 1) not an int >= 1
        - `bad_num_tokens`: `remote_num_tokens` present but not an int >= 0
        - `bad_prompt_digest`: `meshd_prompt_digest` present but not a string
        - `unsupported_transport`: `meshd_transport` (default `default_transport`) is not in
          `allowed_transports`
        - `bad_transports`: `meshd_transports` present but not a list of strings (names we do
          not know are dropped; `meshd_transport` then leads)
        - `bad_host`: `meshd_host` present but not a dict
        """
        if not params or not params.get("do_remote_prefill"):
            return ParamsError.NOT_REMOTE_PREFILL
        host, port = params.get("remote_host"), params.get("remote_port")
        if (not isinstance(host, str) or not host or not isinstance(port, int)
                or isinstance(port, bool) or not 0 < port < 65536):
            return ParamsError.BAD_PEER
        rid = params.get("remote_request_id")
        if not isinstance(rid, str) or not rid:
            return ParamsError.BAD_REQUEST_ID
        blocks = params.get("remote_block_ids")
        if isinstance(blocks, list) and len(blocks) == 1 and isinstance(blocks[0], list):
            blocks = blocks[0]  # one KV cache group, HMA-style nesting
        if not isinstance(blocks, list) or not blocks or not all(
                _is_int(b) and b >= 0 for b in blocks):
            return ParamsError.BAD_BLOCK_IDS
        tp = params.get("tp_size", 1)
        if not _is_int(tp) or tp < 1:
            return ParamsError.BAD_TP_SIZE
        num_tokens = params.get("remote_num_tokens")
        if num_tokens is not None and (not _is_int(num_tokens) or num_tokens < 0):
            return ParamsError.BAD_NUM_TOKENS
        digest = params.get("meshd_prompt_digest")
        if digest is not None and not isinstance(digest, str):
            return ParamsError.BAD_PROMPT_DIGEST
        transport = params.get("meshd_transport", default_transport)
        if not isinstance(transport, str) or transport not in allowed_transports:
            return ParamsError.UNSUPPORTED_TRANSPORT
        offered = params.get("meshd_transports", [])
        if not isinstance(offered, list) or not all(isinstance(t, str) for t in offered):
            return ParamsError.BAD_TRANSPORTS
        facts = params.get("meshd_host")
        if facts is not None and not isinstance(facts, dict):
            return ParamsError.BAD_HOST
        known = tuple(t for t in offered if t in allowed_transports)
        return RemotePrefill(Peer(host, port), rid, tuple(blocks),
                             str(params.get("remote_engine_id") or ""), tp, transport,
                             num_tokens, digest, known, facts)
