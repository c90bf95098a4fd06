"""Ed25519 node identity: the agent's signing key, created on first start.

The key is a 32-byte seed stored hex-encoded in `<state_dir>/node.key` with mode 0600. A key
file that the group or others can read (or write) is refused: a leaked key lets anyone act as
this node. The node id is derived from the public key, so it cannot be claimed by another key.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import SigningKey

KEY_FILE = "node.key"


class IdentityError(Exception):
    """The key file is unsafe, unreadable or malformed; the message says what to do."""


def node_id_for(public_key: bytes) -> str:
    """Node id: `n-` + the first 16 hex digits of sha256(public key)."""
    return "n-" + hashlib.sha256(public_key).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Identity:
    """A loaded signing identity. `sign` returns the 64-byte detached signature."""

    signing_key: SigningKey
    path: Path | None = None

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def node_id(self) -> str:
        return node_id_for(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return bytes(self.signing_key.sign(message).signature)

    @staticmethod
    def generate() -> Identity:
        """A fresh in-memory identity (tests, simulated agents)."""
        return Identity(SigningKey.generate())


def _check_mode(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise IdentityError(
            f"refusing key file {path}: mode {mode:04o} lets other users read or write it; "
            f"run `chmod 600 {path}` (and check who may have copied it)")


def load_or_create(state_dir: str | Path, filename: str = KEY_FILE) -> Identity:
    """Load `<state_dir>/<filename>`, creating it (mode 0600, dir 0700) on first start."""
    directory = Path(state_dir).expanduser()
    path = directory / filename
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        seed = SigningKey.generate().encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(seed.hex() + "\n")
    return load(path)


def load(path: str | Path) -> Identity:
    """Load an existing key file, refusing one readable by others."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise IdentityError(f"key file {p} not found")
    _check_mode(p)
    text = p.read_text().strip()
    try:
        seed = bytes.fromhex(text)
    except ValueError:
        raise IdentityError(f"key file {p} is not a hex-encoded Ed25519 seed") from None
    if len(seed) != 32:
        raise IdentityError(f"key file {p} holds {len(seed)} bytes; an Ed25519 seed is 32")
    return Identity(SigningKey(seed), p)
