"""Block layout arithmetic and the two authenticators."""

from __future__ import annotations

import pytest
from nacl.signing import SigningKey

from meshd.kv_transfer.auth import Ed25519Authenticator, SharedSecretAuthenticator
from meshd.kv_transfer.layout import BlockLayout


@pytest.mark.parametrize(
    ("layout", "half", "per_layer", "per_block"),
    [
        (BlockLayout(32, 8, 128, "bfloat16", 16), 32768, 65536, 2097152),
        (BlockLayout(2, 2, 16, "float32", 4), 512, 1024, 2048),
        (BlockLayout(1, 1, 1, "float8_e4m3fn", 1), 1, 2, 2),
    ],
)
def test_layout_sizes(layout: BlockLayout, half: int, per_layer: int, per_block: int) -> None:
    assert layout.half_bytes == half
    assert layout.bytes_per_block_per_layer == per_layer
    assert layout.bytes_per_block == per_block
    assert BlockLayout.from_dict(layout.to_dict()) == layout


def test_layout_compatible_reason() -> None:
    a = BlockLayout(4, 2, 64, "bfloat16", 16)
    assert a.compatible(a) is None
    reason = a.compatible(BlockLayout(4, 2, 64, "float16", 32))
    assert reason == "layout mismatch: dtype: 'bfloat16' != 'float16', block_size: 16 != 32"


@pytest.mark.parametrize(
    "bad",
    [
        {"num_layers": 1, "num_kv_heads": 1, "head_dim": 1, "dtype": "float16"},
        {"num_layers": 1, "num_kv_heads": 1, "head_dim": 1, "dtype": "float16", "block_size": 0},
        {"num_layers": True, "num_kv_heads": 1, "head_dim": 1, "dtype": "float16", "block_size": 1},
        {"num_layers": 1, "num_kv_heads": 1, "head_dim": 1, "dtype": "int4", "block_size": 1},
        {"num_layers": 1, "num_kv_heads": 1, "head_dim": 1, "dtype": "f", "block_size": 1, "x": 1},
        [1, 2, 3],
    ],
)
def test_layout_from_dict_is_strict(bad: object) -> None:
    with pytest.raises(ValueError):
        BlockLayout.from_dict(bad)


def make_ed25519_pair() -> tuple[Ed25519Authenticator, Ed25519Authenticator]:
    a, b = SigningKey.generate(), SigningKey.generate()
    return (
        Ed25519Authenticator(a, [bytes(b.verify_key)]),
        Ed25519Authenticator(b, [bytes(a.verify_key)]),
    )


def test_ed25519_proofs() -> None:
    alice, bob = make_ed25519_pair()
    proof = alice.prove("client", b"t" * 32)
    assert bob.verify(alice.identity(), "client", b"t" * 32, proof) is None
    assert bob.verify(alice.identity(), "client", b"u" * 32, proof) is not None  # other transcript
    assert bob.verify(alice.identity(), "server", b"t" * 32, proof) is not None  # reflected role
    stranger = Ed25519Authenticator(SigningKey.generate(), [])
    reason = bob.verify(stranger.identity(), "client", b"t" * 32, stranger.prove("client", b"t"))
    assert reason is not None and reason.startswith("untrusted")


def test_hmac_proofs() -> None:
    a = SharedSecretAuthenticator(b"s" * 32, "a")
    b = SharedSecretAuthenticator(b"s" * 32, "b")
    other = SharedSecretAuthenticator(b"x" * 32, "c")
    assert b.verify(a.identity(), "server", b"t", a.prove("server", b"t")) is None
    assert b.verify(a.identity(), "client", b"t", a.prove("server", b"t")) is not None
    assert b.verify(other.identity(), "server", b"t", other.prove("server", b"t")) is not None
    with pytest.raises(ValueError):
        SharedSecretAuthenticator(b"short")
