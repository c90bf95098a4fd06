"""Pure helpers of meshd's vLLM KV connector (no vllm, no torch): settings, transfer params,
load planning, the prefill side's block leases and the decode side's receive bookkeeping.

Kept apart from `vllm_connector` (which imports vllm) so they are unit-tested in meshd's own venv.
"""

from __future__ import annotations

import math
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshd.kv_transfer.auth import Authenticator, Ed25519Authenticator, SharedSecretAuthenticator
from meshd.kv_transfer.transport import Peer

DEFAULT_LEASE_TIMEOUT_S = 30.0
DEFAULT_PULL_TIMEOUT_S = 30.0
DEFAULT_LOOKUP_WAIT_S = 2.0
TRANSFER_TIMEOUT_S = 30.0  # the server's per-connection transfer deadline
RENEW_MARGIN_S = 1.0
TRANSPORTS = ("tcp",)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True, slots=True)
class ConnectorSettings:
    """`kv_connector_extra_config`, parsed.

    Keys: `secret_file` (first line is the mesh secret, >= 16 bytes) or `node_key_file` (hex
    Ed25519 seed, mode 0600) + `trusted_keys_file` (hex public keys, whitespace separated);
    `host`/`port`: where the prefill side's transfer server listens (port + TP rank per worker;
    required on a producer); `advertise_host`: what goes into `remote_host` (default `host`);
    `transport` (`tcp`); `lease_timeout_s`, `pull_timeout_s`, `lookup_wait_s`."""

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
                    "trusted_keys_file"):
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
        s = ConnectorSettings(**kw)
        if s.transport not in TRANSPORTS:
            raise ValueError(f"kv_connector_extra_config.transport: {s.transport!r} is not "
                             f"supported by the vLLM connector; valid: {', '.join(TRANSPORTS)}")
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


def load_authenticator(s: ConnectorSettings, node_id: str = "") -> Authenticator:
    """The handshake authenticator the settings name. Raises ValueError."""
    if s.secret_file:
        try:
            lines = Path(s.secret_file).read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"secret_file: {exc}") from None
        secret = (lines[0].strip() if lines else "").encode()
        return SharedSecretAuthenticator(secret, node_id)
    from nacl.signing import SigningKey

    path = Path(s.node_key_file)
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ValueError(f"node_key_file: {path} is readable by others (chmod 600)")
        seed = bytes.fromhex(path.read_text().strip())
        trusted = [bytes.fromhex(k) for k in Path(s.trusted_keys_file).read_text().split()]
    except OSError as exc:
        raise ValueError(f"node key / trusted keys: {exc}") from None
    if len(seed) != 32:
        raise ValueError(f"node_key_file: holds {len(seed)} bytes; an Ed25519 seed is 32")
    return Ed25519Authenticator(SigningKey(seed), trusted)


# --------------------------------------------------------------------------------------------
# kv_transfer_params


def prefill_params(*, request_id: str, block_ids: Sequence[int], engine_id: str, host: str,
                   port: int, tp_size: int, num_tokens: int, transport: str) -> dict[str, Any]:
    """What the prefill side returns: vLLM's NixlConnector fields plus meshd's own."""
    return {
        "do_remote_prefill": True, "do_remote_decode": False,
        "remote_engine_id": engine_id, "remote_block_ids": list(block_ids),
        "remote_request_id": request_id, "remote_host": host, "remote_port": port,
        "tp_size": tp_size, "remote_num_tokens": num_tokens, "meshd_transport": transport,
    }


@dataclass(frozen=True, slots=True)
class RemotePrefill:
    """The decode side's view of a prefill response's `kv_transfer_params`."""

    peer: Peer
    request_id: str
    block_ids: tuple[int, ...]
    engine_id: str
    tp_size: int

    @staticmethod
    def parse(params: Mapping[str, Any] | None) -> RemotePrefill | str:
        """The parsed params, or why they are unusable."""
        if not params or not params.get("do_remote_prefill"):
            return "not_remote_prefill"
        host, port = params.get("remote_host"), params.get("remote_port")
        rid, blocks = params.get("remote_request_id"), params.get("remote_block_ids")
        if (not isinstance(host, str) or not host or not isinstance(port, int)
                or isinstance(port, bool) or not 0 < port < 65536):
            return "bad_peer"
        if not isinstance(rid, str) or not rid:
            return "bad_request_id"
        if (isinstance(blocks, list) and len(blocks) == 1 and isinstance(blocks[0], list)):
            blocks = blocks[0]  # one KV cache group, HMA-style nesting
        if not isinstance(blocks, list) or not blocks or not all(
                _is_int(b) and b >= 0 for b in blocks):
            return "bad_block_ids"
        tp = params.get("tp_size", 1)
        if not _is_int(tp) or tp < 1:
            return "bad_tp_size"
        transport = params.get("meshd_transport", "tcp")
        if transport not in TRANSPORTS:
            return "unsupported_transport"
        return RemotePrefill(Peer(host, port), rid, tuple(blocks),
                             str(params.get("remote_engine_id") or ""), tp)


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

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "host": self.peer.host, "port": self.peer.port,
                "remote_request_id": self.remote_request_id,
                "remote_block_ids": list(self.remote_block_ids),
                "local_block_ids": list(self.local_block_ids)}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> LoadPlan:
        return LoadPlan(str(d["request_id"]), Peer(str(d["host"]), int(d["port"])),
                        str(d["remote_request_id"]), tuple(int(b) for b in d["remote_block_ids"]),
                        tuple(int(b) for b in d["local_block_ids"]))


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
                    tuple(remote.block_ids[first:end]), tuple(local_block_ids[first:end]))


# --------------------------------------------------------------------------------------------
# prefill side: leases


@dataclass(slots=True)
class LeaseStats:
    granted: int = 0
    sent: int = 0
    expired: int = 0
    lookups_missed: int = 0


class LeaseTable:
    """Blocks the prefill side holds for decode peers, by engine request id. A `BlockSource`.

    Thread-safe: `grant`/`take_done` run on the engine's worker thread, `lookup`/`on_sent` on
    transport threads. A lease ends when the peer confirms an intact copy (`on_sent`) or at its
    deadline; either way its id is returned once by `take_done` so vLLM frees the blocks.
    A `lookup` (a fetch starting) renews the deadline past the server's transfer deadline, so
    blocks are never freed under a transfer in flight. `lookup` waits up to `lookup_wait_s` for
    a grant that is still on its way from the scheduler (the decode side can be faster than the
    prefill engine's next step)."""

    def __init__(self, timeout_s: float, *, lookup_wait_s: float = DEFAULT_LOOKUP_WAIT_S,
                 transfer_timeout_s: float = TRANSFER_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._timeout_s, self._wait_s = timeout_s, lookup_wait_s
        self._renew_s = transfer_timeout_s + RENEW_MARGIN_S
        self._clock = clock
        self._cond = threading.Condition()
        self._held: dict[str, tuple[tuple[int, ...], float]] = {}
        self._done: set[str] = set()
        self.stats = LeaseStats()

    def __len__(self) -> int:
        with self._cond:
            return len(self._held)

    def held(self) -> dict[str, tuple[int, ...]]:
        with self._cond:
            return {rid: blocks for rid, (blocks, _) in self._held.items()}

    def grant(self, request_id: str, block_ids: Iterable[int], expires_at: float | None = None
              ) -> None:
        with self._cond:
            at = self._clock() + self._timeout_s if expires_at is None else expires_at
            self._held[request_id] = (tuple(block_ids), at)
            self.stats.granted += 1
            self._cond.notify_all()

    def lookup(self, request_id: str) -> list[int] | None:
        end = self._clock() + self._wait_s
        with self._cond:
            while True:
                entry = self._held.get(request_id)
                if entry is not None:
                    renewed = max(entry[1], self._clock() + self._renew_s)
                    self._held[request_id] = (entry[0], renewed)
                    return list(entry[0])
                left = end - self._clock()
                if left <= 0 or request_id in self._done:
                    self.stats.lookups_missed += 1
                    return None
                self._cond.wait(min(left, 0.05))

    def on_sent(self, request_id: str) -> None:
        with self._cond:
            if self._held.pop(request_id, None) is not None:
                self._done.add(request_id)
                self.stats.sent += 1

    def release(self, request_id: str) -> None:
        """End a lease without a transfer (e.g. the engine aborted the request)."""
        with self._cond:
            if self._held.pop(request_id, None) is not None:
                self._done.add(request_id)

    def expire(self) -> list[str]:
        """End the leases past their deadline; returns their ids (also queued for take_done)."""
        now = self._clock()
        with self._cond:
            gone = [rid for rid, (_, at) in self._held.items() if at <= now]
            for rid in gone:
                del self._held[rid]
                self._done.add(rid)
            self.stats.expired += len(gone)
        return gone

    def take_done(self) -> set[str]:
        """Ids whose lease ended since the last call (sent, expired or released)."""
        self.expire()
        with self._cond:
            done, self._done = self._done, set()
        return done


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
    errors: dict[str, int] = field(default_factory=dict)

    def succeeded(self, request_id: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            self._ok.add(request_id)
            self.ok_total += 1
            self.bytes_total += nbytes
            self.seconds_total += seconds

    def failed(self, request_id: str, local_block_ids: Iterable[int], code: str) -> None:
        with self._lock:
            self._failed[request_id] = tuple(local_block_ids)
            self.failed_total += 1
            self.errors[code] = self.errors.get(code, 0) + 1

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


