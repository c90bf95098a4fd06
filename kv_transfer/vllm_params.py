"""Pure helpers of meshd's vLLM KV connector (no vllm, no torch): settings, load planning and
the decode side's receive bookkeeping. The transfer params (`kv_transfer.params`), the prefill
side's block leases (`kv_transfer.leases`) and the authenticator (`kv_transfer.auth`) are shared
with the embedded engine.

Kept apart from `vllm_connector` (which imports vllm) so they are unit-tested in meshd's own venv.
"""

from __future__ import annotations

import math
import socket
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshd.kv_transfer.params import RemotePrefill
from meshd.kv_transfer.puller import PullReason
from meshd.kv_transfer.select import HostFacts
from meshd.kv_transfer.transport import Peer

DEFAULT_LEASE_TIMEOUT_S = 30.0
DEFAULT_PULL_TIMEOUT_S = 30.0
DEFAULT_LOOKUP_WAIT_S = 2.0
TRANSFER_TIMEOUT_S = 30.0  # the server's per-connection transfer deadline
# What the connector serves and pulls (`RemotePrefill.parse`'s allowed): CPU KV over tcp or shm,
# CUDA KV over cuda_ipc, nccl, or tcp/shm staged through host memory (see `memory.StagedKV`).
TRANSPORTS = ("tcp", "shm", "cuda_ipc", "nccl")
AUTO = "auto"  # serve every transport that can run here on one port; decode picks per pair


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True, slots=True)
class ConnectorSettings:
    """`kv_connector_extra_config`, parsed.

    Keys: `secret_file` (first line is the mesh secret, >= 16 bytes) or `node_key_file` (hex
    Ed25519 seed, mode 0600) + `trusted_keys_file` (hex public keys, whitespace separated);
    `host`/`port`: where the prefill side's transfer server listens (port + TP rank per worker;
    required on a producer); `advertise_host`: what goes into `remote_host` (default `host`);
    `transport`: what this prefill side serves, one of TRANSPORTS or `auto` (all that can run
    here on one port, see `select.offer`); the decode side pulls over what the prefill response
    names, picking per pair from `auto`'s list (`select.pull_transport`); `hostname` (default: the
    machine's), `rdma`, `nvlink`: this host's facts for that pick (the launcher fills them from
    the capability report); `lease_timeout_s`, `pull_timeout_s`, `lookup_wait_s`;
    `max_leased_blocks`: the most blocks a prefill side holds for decode peers at once (0: 3/4
    of its KV pool; past it a prefill's blocks are freed at once and it answers without params)."""

    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str = ""
    transport: str = "tcp"
    secret_file: str = ""
    node_key_file: str = ""
    trusted_keys_file: str = ""
    lease_timeout_s: float = DEFAULT_LEASE_TIMEOUT_S
    pull_timeout_s: float = DEFAULT_PULL_TIMEOUT_S
    lookup_wait_s: float = DEFAULT_LOOKUP_WAIT_S
    max_leased_blocks: int = 0
    hostname: str = ""
    rdma: bool = False
    nvlink: bool = False

    @staticmethod
    def parse(extra: Mapping[str, Any] | None, *, producer: bool) -> ConnectorSettings:
        """Raises ValueError naming the bad key."""
        extra = dict(extra or {})
        known = set(ConnectorSettings.__slots__)
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"kv_connector_extra_config: unknown keys {unknown}; "
                             f"valid: {sorted(known)}")
        kw: dict[str, Any] = {}
        for key in ("host", "advertise_host", "transport", "secret_file", "node_key_file",
                    "trusted_keys_file", "hostname"):
            if key in extra:
                if not isinstance(extra[key], str):
                    raise ValueError(f"kv_connector_extra_config.{key}: must be a string")
                kw[key] = extra[key]
        if "port" in extra:
            port = extra["port"]
            if isinstance(port, str) and port.isdigit():
                port = int(port)
            if not _is_int(port) or not 0 <= port < 65536:
                raise ValueError("kv_connector_extra_config.port: must be an int in 0..65535")
            kw["port"] = port
        for key in ("lease_timeout_s", "pull_timeout_s", "lookup_wait_s"):
            if key in extra:
                try:
                    value = float(extra[key])
                except (TypeError, ValueError):
                    raise ValueError(f"kv_connector_extra_config.{key}: must be a number") from None
                if not value > 0 or math.isinf(value):
                    raise ValueError(f"kv_connector_extra_config.{key}: must be > 0")
                kw[key] = value
        if "max_leased_blocks" in extra:
            value = extra["max_leased_blocks"]
            if isinstance(value, str) and value.isdigit():
                value = int(value)
            if not _is_int(value) or value < 0:
                raise ValueError("kv_connector_extra_config.max_leased_blocks: must be an int "
                                 ">= 0")
            kw["max_leased_blocks"] = value
        for key in ("rdma", "nvlink"):
            if key in extra:
                value = extra[key]
                if isinstance(value, str) and value.lower() in ("true", "false"):
                    value = value.lower() == "true"
                if not isinstance(value, bool):
                    raise ValueError(f"kv_connector_extra_config.{key}: must be true or false")
                kw[key] = value
        s = ConnectorSettings(**kw)
        if s.transport not in (*TRANSPORTS, AUTO):
            raise ValueError(f"kv_connector_extra_config.transport: {s.transport!r} is not "
                             f"supported by the vLLM connector; valid: "
                             f"{', '.join((*TRANSPORTS, AUTO))}")
        if not s.secret_file and not s.node_key_file:
            raise ValueError("kv_connector_extra_config: give secret_file, or node_key_file and "
                             "trusted_keys_file")
        if s.secret_file and s.node_key_file:
            raise ValueError("kv_connector_extra_config: give secret_file or node_key_file, "
                             "not both")
        if s.node_key_file and not s.trusted_keys_file:
            raise ValueError("kv_connector_extra_config.trusted_keys_file: required with "
                             "node_key_file")
        if producer and s.port == 0:
            raise ValueError("kv_connector_extra_config.port: required on a kv_producer (the "
                             "scheduler reports it to the decode side before the worker starts)")
        return s

    @property
    def remote_host(self) -> str:
        return self.advertise_host or self.host

    def facts(self, kv_device: str) -> HostFacts:
        """This host as the transport pick sees it."""
        return HostFacts(self.hostname or socket.gethostname(), self.advertise_host,
                         gpus=kv_device == "cuda", rdma=self.rdma, nvlink=self.nvlink)


# --------------------------------------------------------------------------------------------
# decode side: load planning


def tokens_to_load(remote: RemotePrefill, num_prompt_tokens: int, num_computed_tokens: int,
                   block_size: int) -> int:
    """How many prompt tokens past `num_computed_tokens` the remote blocks can provide."""
    covered = min(num_prompt_tokens, len(remote.block_ids) * block_size)
    if covered < num_prompt_tokens or num_computed_tokens % block_size:
        return 0  # the remote side does not hold the whole prompt, or an unaligned local hit
    return max(0, covered - num_computed_tokens)


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """One pull: remote blocks (in order) into local blocks (same order)."""

    request_id: str  # the decode engine's request id (what vLLM's scheduler tracks)
    peer: Peer
    remote_request_id: str
    remote_block_ids: tuple[int, ...]
    local_block_ids: tuple[int, ...]
    transport: str = "tcp"  # what the prefill side serves (its `meshd_transport`)

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "host": self.peer.host, "port": self.peer.port,
                "remote_request_id": self.remote_request_id,
                "remote_block_ids": list(self.remote_block_ids),
                "local_block_ids": list(self.local_block_ids), "transport": self.transport}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> LoadPlan:
        return LoadPlan(str(d["request_id"]), Peer(str(d["host"]), int(d["port"])),
                        str(d["remote_request_id"]), tuple(int(b) for b in d["remote_block_ids"]),
                        tuple(int(b) for b in d["local_block_ids"]), str(d["transport"]))


def plan_load(request_id: str, remote: RemotePrefill, local_block_ids: Sequence[int],
              num_prompt_tokens: int, num_external_tokens: int,
              block_size: int) -> LoadPlan | str:
    """Which local blocks receive which remote blocks, after vLLM allocated `local_block_ids`
    (all of the request's blocks, locally cached ones first). Or why not."""
    local_tokens = num_prompt_tokens - num_external_tokens
    if num_external_tokens <= 0 or local_tokens < 0 or local_tokens % block_size:
        return "unaligned"
    first = local_tokens // block_size
    end = math.ceil(num_prompt_tokens / block_size)
    if end > len(local_block_ids) or end > len(remote.block_ids) or first >= end:
        return "block_count"
    return LoadPlan(request_id, remote.peer, remote.request_id,
                    tuple(remote.block_ids[first:end]), tuple(local_block_ids[first:end]),
                    remote.transport)


# --------------------------------------------------------------------------------------------
# decode side: receive results


@dataclass(slots=True)
class RecvResults:
    """Outcomes of background pulls, handed to vLLM once each. Thread-safe."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ok: set[str] = field(default_factory=set)
    _failed: dict[str, tuple[int, ...]] = field(default_factory=dict)  # id -> local blocks
    _bad_blocks: set[int] = field(default_factory=set)
    ok_total: int = 0
    failed_total: int = 0
    bytes_total: int = 0
    seconds_total: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # failed loads by reason value

    def succeeded(self, request_id: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            self._ok.add(request_id)
            self.ok_total += 1
            self.bytes_total += nbytes
            self.seconds_total += seconds

    def failed(self, request_id: str, local_block_ids: Iterable[int],
               reason: PullReason) -> None:
        """A load that did not land; `errors` counts by `reason.value`."""
        with self._lock:
            self._failed[request_id] = tuple(local_block_ids)
            self.failed_total += 1
            self.errors[reason.value] = self.errors.get(reason.value, 0) + 1

    def take(self) -> tuple[set[str], set[str]]:
        """(finished ids, failed ids) since the last call; failed ones are among the finished
        and their blocks are queued for `take_bad_blocks` (same engine step)."""
        with self._lock:
            failed = set(self._failed)
            for blocks in self._failed.values():
                self._bad_blocks.update(blocks)
            finished = self._ok | failed
            self._ok, self._failed = set(), {}
        return finished, failed

    def take_bad_blocks(self) -> set[int]:
        with self._lock:
            bad, self._bad_blocks = self._bad_blocks, set()
        return bad


