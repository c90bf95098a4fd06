"""Configuration of the engine's worker server (`meshd engine serve`): one frozen dataclass.

No torch import here: the CLI parser imports this module to register the flags. Validation
raises ValueError naming the flag; secrets are read from files here, nowhere else.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nacl.signing import SigningKey

ROLES = ("prefill", "decode", "both")
TRANSPORTS = ("tcp", "shm", "auto")  # auto: serve tcp and shm on one port; decode picks


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"--{name.replace('_', '-')}: {msg}")


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Everything `serve()` needs. Ports 0 pick a free port; `kv_events_port` None: no events.

    Auth for KV transfer: Ed25519 when `kv_node_key` and `kv_trusted_keys` are both set (files:
    an agent key, and hex public keys one per line), else the per-mesh shared secret
    (`kv_secret`, or the first line of `kv_secret_file`; required unless role is "both", where
    a random per-process secret is used and only this process can pull from itself).

    Serving calls (`/v1/*`, `/debug/*`) need `Authorization: Bearer <api_key>` when `api_key`
    is set (the first line of `--api-key-file`; the agent always sets one, the node's worker
    token); `/health` and `/metrics` stay open, as on vLLM. Blocks held for decode peers are
    bounded: `max_leased_blocks` in all and `max_leased_blocks_per_caller` per peer address
    (0: 3/4 and 1/2 of `num_blocks`); a prefill past a bound gets 429. With `attest_key` (the
    node's key file), a request carrying `meshd_attest` gets the node's signed attestation of
    what each choice produced (`meshd/receipts.py`) in its last chunk's `meshd.attestations`.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "meshd-tiny"
    model_path: str = ""
    moe: bool = False
    role: str = "both"
    block_size: int = 16
    num_blocks: int = 512
    max_num_seqs: int = 32
    max_model_len: int = 0  # 0: the model's own
    seed: int = 0
    engine_id: str = ""  # "": derived from host and port at start
    kv_transfer: str = "tcp"
    kv_host: str = ""  # "": same as host
    kv_port: int = 0
    kv_advertise_host: str = ""  # what prefill reports as remote_host ("": kv_host)
    kv_events_port: int | None = None
    kv_replay_port: int | None = None
    kv_secret: bytes = b""
    kv_node_key: str = ""
    kv_trusted_keys: str = ""
    lease_timeout_s: float = 30.0
    pull_timeout_s: float = 10.0
    top_experts: int = 4
    api_key: str = field(default="", repr=False)
    max_leased_blocks: int = 0
    max_leased_blocks_per_caller: int = 0
    kv_events_token_ids: bool = False  # BlockStored carries token ids (cache-health re-hash)
    attest_key: str = ""  # the node's Ed25519 key file: sign outputs when asked (receipts)

    def __post_init__(self) -> None:
        _check(self.role in ROLES, "role", f"must be one of {ROLES}, got {self.role!r}")
        _check(self.kv_transfer in TRANSPORTS, "kv_transfer",
               f"must be one of {TRANSPORTS}, got {self.kv_transfer!r}")
        for f in ("port", "kv_port"):
            _check(0 <= getattr(self, f) < 65536, f, "must be a port number")
        for f in ("block_size", "num_blocks", "max_num_seqs"):
            _check(getattr(self, f) >= 1, f, f"must be >= 1, got {getattr(self, f)}")
        _check(self.max_model_len >= 0, "max_model_len", "must be >= 0")
        _check(self.lease_timeout_s > 0, "lease_timeout_s", "must be > 0")
        _check(self.pull_timeout_s > 0, "pull_timeout_s", "must be > 0")
        for f in ("max_leased_blocks", "max_leased_blocks_per_caller"):
            _check(getattr(self, f) >= 0, f, "must be >= 0")
        _check(bool(self.kv_node_key) == bool(self.kv_trusted_keys), "kv_node_key",
               "--kv-node-key and --kv-trusted-keys go together")
        _check(self.kv_replay_port is None or self.kv_events_port is not None, "kv_replay_port",
               "needs --kv-events-port")
        if self.role != "both" and not self.kv_node_key:
            _check(bool(self.kv_secret), "kv_secret",
                   f"role {self.role} needs --kv-secret, --kv-secret-file or --kv-node-key")

    @property
    def bind_kv_host(self) -> str:
        return self.kv_host or self.host

    @property
    def lease_bounds(self) -> tuple[int, int]:
        """(blocks leased in all, per caller) with the defaults applied."""
        total = self.max_leased_blocks or max(1, self.num_blocks * 3 // 4)
        return total, min(total, self.max_leased_blocks_per_caller
                          or max(1, self.num_blocks // 2))


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    """Register the `serve` flags on `p` (used by the meshd CLI and by `python -m`)."""
    d = WorkerConfig()
    p.add_argument("--host", default=d.host, help="HTTP bind address")
    p.add_argument("--port", type=int, default=d.port, help="HTTP port (0: pick a free one)")
    p.add_argument("--model-name", default=None, help="served model name (default: the model's)")
    p.add_argument("--model-path", default="", help="local HF dir (default: built-in tiny model)")
    p.add_argument("--moe", action="store_true", help="built-in tiny MoE model instead")
    p.add_argument("--role", choices=ROLES, default=d.role)
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--num-blocks", type=int, default=d.num_blocks)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--max-model-len", type=int, default=0, help="0: the model's")
    p.add_argument("--seed", type=int, default=d.seed, help="weights and default sampling seed")
    p.add_argument("--engine-id", default="", help="remote_engine_id to report")
    p.add_argument("--kv-transfer", choices=TRANSPORTS, default=d.kv_transfer)
    p.add_argument("--kv-host", default="", help="KV transfer bind address (default: --host)")
    p.add_argument("--kv-port", type=int, default=0, help="KV transfer port (0: free one)")
    p.add_argument("--kv-advertise-host", default="", help="remote_host reported to decode")
    p.add_argument("--kv-events-port", type=int, default=None, help="ZMQ PUB port (off if unset)")
    p.add_argument("--kv-replay-port", type=int, default=None, help="ZMQ replay port")
    p.add_argument("--kv-secret", default=None, help="per-mesh KV transfer secret (>= 16 bytes)")
    p.add_argument("--kv-secret-file", default=None, help="file whose first line is the secret")
    p.add_argument("--kv-node-key", default="", help="Ed25519 node key file (with trusted keys)")
    p.add_argument("--kv-trusted-keys", default="", help="file of trusted hex public keys")
    p.add_argument("--lease-timeout-s", type=float, default=d.lease_timeout_s,
                   help="free held prefill blocks not pulled within this time")
    p.add_argument("--pull-timeout-s", type=float, default=d.pull_timeout_s)
    p.add_argument("--kv-events-token-ids", action="store_true",
                   help="KV events carry the blocks' token ids (lets the gateway re-hash "
                        "them to check its hash agrees; off: hashes only)")
    p.add_argument("--api-key-file", default="",
                   help="file whose first line is the bearer token serving calls must carry")
    p.add_argument("--attest-key-file", default="",
                   help="the node's Ed25519 key file (the agent's node.key): sign what each "
                        "request produced when it asks (meshd_attest, for receipts)")
    p.add_argument("--max-leased-blocks", type=int, default=0,
                   help="blocks held for decode peers in all (0: 3/4 of --num-blocks)")
    p.add_argument("--max-leased-blocks-per-caller", type=int, default=0,
                   help="blocks held for decode peers per caller address (0: 1/2)")


def from_args(args: argparse.Namespace) -> WorkerConfig:
    """Build the config from parsed `add_serve_flags` flags. Raises ValueError."""
    secret = b""
    if args.kv_secret and args.kv_secret_file:
        raise ValueError("--kv-secret and --kv-secret-file: give one")
    if args.kv_secret:
        secret = args.kv_secret.encode()
    elif args.kv_secret_file:
        secret = first_line(args.kv_secret_file, "--kv-secret-file").encode()
    api_key = first_line(args.api_key_file, "--api-key-file") if args.api_key_file else ""
    if args.attest_key_file:
        attest_key(args.attest_key_file)  # refused at start, not at the first request
    default_name = "meshd-tiny-moe" if args.moe else "meshd-tiny"
    if args.model_path:
        default_name = Path(args.model_path).name
    return WorkerConfig(
        host=args.host, port=args.port, model_name=args.model_name or default_name,
        model_path=args.model_path, moe=args.moe, role=args.role, block_size=args.block_size,
        num_blocks=args.num_blocks, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, seed=args.seed, engine_id=args.engine_id,
        kv_transfer=args.kv_transfer, kv_host=args.kv_host, kv_port=args.kv_port,
        kv_advertise_host=args.kv_advertise_host, kv_events_port=args.kv_events_port,
        kv_replay_port=args.kv_replay_port, kv_secret=secret, kv_node_key=args.kv_node_key,
        kv_trusted_keys=args.kv_trusted_keys, lease_timeout_s=args.lease_timeout_s,
        pull_timeout_s=args.pull_timeout_s, api_key=api_key,
        max_leased_blocks=args.max_leased_blocks,
        max_leased_blocks_per_caller=args.max_leased_blocks_per_caller,
        kv_events_token_ids=args.kv_events_token_ids, attest_key=args.attest_key_file)


def first_line(path: str, flag: str) -> str:
    """The first line of a secret file, stripped; ValueError naming `flag` when unreadable or
    empty."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ValueError(f"{flag}: {e}") from None
    line = lines[0].strip() if lines else ""
    if not line:
        raise ValueError(f"{flag}: the file is empty")
    return line


def attest_key(path: str) -> SigningKey:
    """The node key outputs are attested with (`--attest-key-file`); ValueError if unsafe or
    unreadable."""
    from meshd.node_agent import identity

    try:
        return identity.load(path).signing_key
    except identity.IdentityError as e:
        raise ValueError(f"--attest-key-file: {e}") from None
