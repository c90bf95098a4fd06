"""Peer authentication for the transfer handshake: Ed25519 node identity or a mesh secret.

Both authenticators plug into the same mutual challenge-response (see `handshake.py`): each side
sends a fresh 32-byte nonce, both derive one transcript hash from the two nonces, identities,
scheme and layouts, and each proves knowledge of its key over `role || transcript`. Because the
transcript contains the other side's fresh nonce, a recorded handshake cannot be replayed, and
because the role is bound in, a server's proof cannot be reflected back as a client's.

An authenticator holds key material only; it does no I/O and is safe to share between threads.
`load_authenticator` builds one from configuration (files), for the embedded engine and the vLLM
connector alike.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

ROLES = ("client", "server")


class Authenticator(Protocol):
    scheme: str  # both sides must use the same scheme

    def identity(self) -> bytes:
        """Public identity sent in the handshake (a public key, or a node label)."""
        ...

    def prove(self, role: str, transcript: bytes) -> bytes:
        """Proof that this side holds the key, bound to `role` and `transcript`."""
        ...

    def verify(
        self, peer_identity: bytes, role: str, transcript: bytes, proof: bytes
    ) -> str | None:
        """None when the peer's proof is valid and its identity trusted; else the reason."""
        ...


def _message(role: str, transcript: bytes) -> bytes:
    if role not in ROLES:
        raise ValueError(f"role: must be one of {ROLES}, got {role!r}")
    return b"meshd-kv-auth-v1|" + role.encode() + b"|" + transcript


class Ed25519Authenticator:
    """Node identity: this node's signing key; peers must present a public key in `trusted`."""

    scheme = "ed25519"

    def __init__(self, signing_key: SigningKey, trusted: Iterable[bytes]) -> None:
        self._key = signing_key
        self._public = bytes(signing_key.verify_key)
        self._trusted = frozenset(bytes(k) for k in trusted)
        for key in self._trusted:
            if len(key) != 32:
                raise ValueError(f"trusted: Ed25519 public keys are 32 bytes, got {len(key)}")

    def identity(self) -> bytes:
        return self._public

    def prove(self, role: str, transcript: bytes) -> bytes:
        return bytes(self._key.sign(_message(role, transcript)).signature)

    def verify(
        self, peer_identity: bytes, role: str, transcript: bytes, proof: bytes
    ) -> str | None:
        if peer_identity not in self._trusted:
            return f"untrusted Ed25519 key {peer_identity.hex()[:16]}…"
        try:
            VerifyKey(peer_identity).verify(_message(role, transcript), proof)
        except (BadSignatureError, ValueError, TypeError) as exc:
            return f"bad Ed25519 signature: {exc}"
        return None


class SharedSecretAuthenticator:
    """Per-mesh shared secret (HMAC-SHA256). `node_id` is only a label for logs."""

    scheme = "hmac-sha256"
    MIN_SECRET_BYTES = 16

    def __init__(self, secret: bytes, node_id: str = "") -> None:
        if len(secret) < self.MIN_SECRET_BYTES:
            raise ValueError(f"secret: must be at least {self.MIN_SECRET_BYTES} bytes")
        self._secret = bytes(secret)
        self._node_id = node_id.encode()

    def identity(self) -> bytes:
        return self._node_id

    def prove(self, role: str, transcript: bytes) -> bytes:
        return hmac.new(self._secret, _message(role, transcript), hashlib.sha256).digest()

    def verify(
        self, peer_identity: bytes, role: str, transcript: bytes, proof: bytes
    ) -> str | None:
        if not hmac.compare_digest(self.prove(role, transcript), proof):
            return "bad HMAC proof (wrong mesh secret or tampered handshake)"
        return None


def load_authenticator(*, secret: bytes = b"", secret_file: str = "", node_key_file: str = "",
                       trusted_keys_file: str = "", node_id: str = "") -> Authenticator:
    """The handshake authenticator for one of: a mesh `secret`, a `secret_file` (its first line
    is the secret), or a `node_key_file` (hex Ed25519 seed, mode 0600, checked by
    `meshd.node_agent.identity.load`) with a `trusted_keys_file` (hex public keys, whitespace
    separated). `node_id` labels the secret schemes in logs. Raises ValueError saying which
    file is wrong, what is wrong with it and how to fix it."""
    given = [n for n, v in (("secret", secret), ("secret_file", secret_file),
                            ("node_key_file", node_key_file)) if v]
    if len(given) != 1:
        raise ValueError(
            "transfer auth: give exactly one of a mesh secret (secret or secret_file) or "
            f"node_key_file with trusted_keys_file; got {', '.join(given) or 'none'}")
    if node_key_file:
        return _ed25519(node_key_file, trusted_keys_file)
    if secret_file:
        try:
            lines = Path(secret_file).read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"secret_file {secret_file}: cannot read it ({exc.strerror}); "
                             "give a readable file whose first line is the mesh secret") from None
        secret = (lines[0].strip() if lines else "").encode()
        where = f"secret_file {secret_file}: its first line"
    else:
        where = "secret"
    if len(secret) < SharedSecretAuthenticator.MIN_SECRET_BYTES:
        raise ValueError(f"{where} holds {len(secret)} bytes; the mesh secret needs at least "
                         f"{SharedSecretAuthenticator.MIN_SECRET_BYTES} (e.g. the output of "
                         "`openssl rand -hex 32`)")
    return SharedSecretAuthenticator(secret, node_id)


def _ed25519(node_key_file: str, trusted_keys_file: str) -> Ed25519Authenticator:
    from meshd.node_agent import identity  # light: hashlib, nacl; checks the key file's mode

    if not trusted_keys_file:
        raise ValueError("trusted_keys_file: required with node_key_file (a file listing the "
                         "hex Ed25519 public keys of the peers to trust)")
    try:
        ident = identity.load(node_key_file)
    except identity.IdentityError as exc:
        raise ValueError(f"node_key_file: {exc}") from None
    try:
        words = Path(trusted_keys_file).read_text().split()
    except OSError as exc:
        raise ValueError(f"trusted_keys_file {trusted_keys_file}: cannot read it "
                         f"({exc.strerror})") from None
    if not words:
        raise ValueError(f"trusted_keys_file {trusted_keys_file}: holds no keys; list the hex "
                         "Ed25519 public keys of the peers to trust")
    keys = []
    for word in words:
        try:
            key = bytes.fromhex(word)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise ValueError(f"trusted_keys_file {trusted_keys_file}: {word[:20]!r} is not an "
                             "Ed25519 public key (64 hex digits)")
        keys.append(key)
    return Ed25519Authenticator(ident.signing_key, keys)
