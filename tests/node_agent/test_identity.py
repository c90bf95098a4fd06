import os
import stat
from pathlib import Path

import pytest

from meshd.node_agent import identity
from meshd.node_agent.identity import IdentityError


def test_created_on_first_start_with_mode_0600(tmp_path: Path) -> None:
    d = tmp_path / "agent"
    ident = identity.load_or_create(d)
    key = d / identity.KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    again = identity.load_or_create(d)
    assert again.public_key == ident.public_key
    assert ident.node_id == identity.node_id_for(ident.public_key)
    assert ident.node_id.startswith("n-") and len(ident.node_id) == 18


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606])
def test_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    identity.load_or_create(tmp_path)
    key = tmp_path / identity.KEY_FILE
    os.chmod(key, mode)
    with pytest.raises(IdentityError, match=r"chmod 600"):
        identity.load_or_create(tmp_path)


@pytest.mark.parametrize(("content", "message"), [
    ("zz", "not a hex-encoded"), ("abcd", "holds 2 bytes")])
def test_malformed_key_file(tmp_path: Path, content: str, message: str) -> None:
    key = tmp_path / identity.KEY_FILE
    key.write_text(content)
    key.chmod(0o600)
    with pytest.raises(IdentityError, match=message):
        identity.load(key)


def test_sign_verifies_and_node_ids_differ() -> None:
    from nacl.signing import VerifyKey

    a, b = identity.Identity.generate(), identity.Identity.generate()
    sig = a.sign(b"hello")
    assert VerifyKey(a.public_key).verify(b"hello", sig) == b"hello"
    assert a.node_id != b.node_id
