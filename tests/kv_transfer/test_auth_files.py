"""`load_authenticator`: transfer credentials from configuration, one message per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
from nacl.signing import SigningKey

from meshd.kv_transfer.auth import (
    Ed25519Authenticator,
    SharedSecretAuthenticator,
    load_authenticator,
)

SECRET = b"unit-test-mesh-secret-0123456789"


def make_keys(tmp_path: Path, trusted_text: str | None = None) -> tuple[Path, Path, SigningKey]:
    key = SigningKey.generate()
    key_file, trusted = tmp_path / "node.key", tmp_path / "trusted"
    key_file.write_text(key.encode().hex() + "\n")
    key_file.chmod(0o600)
    trusted.write_text(bytes(key.verify_key).hex() + "\n" if trusted_text is None
                       else trusted_text)
    return key_file, trusted, key


def test_secret_and_node_key(tmp_path: Path) -> None:
    auth = load_authenticator(secret=SECRET, node_id="n1")
    assert isinstance(auth, SharedSecretAuthenticator) and auth.identity() == b"n1"
    key_file, trusted, key = make_keys(tmp_path)
    ed = load_authenticator(node_key_file=str(key_file), trusted_keys_file=str(trusted))
    assert isinstance(ed, Ed25519Authenticator) and ed.identity() == bytes(key.verify_key)


def test_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    key_file, trusted, _ = make_keys(tmp_path)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    bad_hex = tmp_path / "bad"
    bad_hex.write_text("zz" * 32 + "\n")
    short_key = tmp_path / "short"
    short_key.write_text("ab" * 16 + "\n")
    cases: list[tuple[dict[str, str | bytes], str]] = [
        ({}, "give exactly one of .* got none"),
        ({"secret": SECRET, "node_key_file": str(key_file)}, "got secret, node_key_file"),
        ({"secret": b"short"}, "secret holds 5 bytes; .* at least 16"),
        ({"secret_file": str(empty)}, f"secret_file {empty}: its first line holds 0 bytes"),
        ({"secret_file": str(tmp_path / "nope")}, "secret_file .*nope: cannot read it"),
        ({"node_key_file": str(key_file)}, "trusted_keys_file: required with node_key_file"),
        ({"node_key_file": str(tmp_path / "nokey"), "trusted_keys_file": str(trusted)},
         "node_key_file: key file .*nokey not found"),
        ({"node_key_file": str(key_file), "trusted_keys_file": str(tmp_path / "none")},
         "trusted_keys_file .*none: cannot read it"),
        ({"node_key_file": str(key_file), "trusted_keys_file": str(empty)}, "holds no keys"),
        ({"node_key_file": str(key_file), "trusted_keys_file": str(bad_hex)},
         "is not an Ed25519 public key"),
        ({"node_key_file": str(key_file), "trusted_keys_file": str(short_key)},
         "is not an Ed25519 public key"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            load_authenticator(**kwargs)  # type: ignore[arg-type]


def test_key_file_mode_is_checked_by_identity(tmp_path: Path) -> None:
    key_file, trusted, _ = make_keys(tmp_path)
    key_file.chmod(0o640)
    with pytest.raises(ValueError, match=r"lets other users read or write it; run `chmod 600"):
        load_authenticator(node_key_file=str(key_file), trusted_keys_file=str(trusted))
