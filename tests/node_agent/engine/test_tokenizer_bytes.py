"""`Tokenizer.token_bytes`: a token's own bytes, whole even when they are partial UTF-8, for the
byte tokenizer and for HF tokenizers (byte-level BPE, SentencePiece byte fallback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from meshd.node_agent.engine.tokenizer import ByteTokenizer, HFTokenizer, byte_level_bytes

TEXTS = ["héllo wörld", "price: 5€ or 7£", "naïve café — ok", "日本語のテキスト", "emoji 🙂 end"]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    """A small GPT-2 style byte-level BPE trained here (no download)."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(TEXTS * 20, trainer)
    path = tmp_path_factory.mktemp("bpe")
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return HFTokenizer(path)


@pytest.mark.parametrize(("token_id", "expected"), [
    (ord("a"), b"a"), (0xE2, b"\xe2"), (0x80, b"\x80"), (0xFF, b"\xff"),
    (256, b""), (262, b""), (10_000, b""), (-1, b"")])
def test_byte_tokenizer(token_id: int, expected: bytes) -> None:
    assert ByteTokenizer().token_bytes(token_id) == expected


@pytest.mark.parametrize("text", TEXTS)
def test_bytes_of_a_sequence_decode_to_its_text(bpe: HFTokenizer, text: str) -> None:
    for tok in (bpe, ByteTokenizer()):
        ids = tok.encode(text, add_bos=False)
        joined = b"".join(tok.token_bytes(i) for i in ids)
        assert joined == text.encode() and joined.decode() == tok.decode(ids) == text


def test_partial_utf8_token_keeps_its_byte(bpe: HFTokenizer) -> None:
    # byte 0xE2 (first byte of "€") is the alphabet token "â"; alone it decodes to U+FFFD
    tid = bpe._tok.token_to_id("â")
    assert tid is not None
    assert bpe.decode([tid]) == "\ufffd" and bpe.token_bytes(tid) == b"\xe2"
    assert bpe.token_bytes(bpe._tok.token_to_id("Ġ")) == b" "


def test_special_token_has_no_bytes(bpe: HFTokenizer) -> None:
    eos = bpe.eos_token_id
    assert eos is not None and bpe.decode([eos]) == "" and bpe.token_bytes(eos) == b""


def test_byte_fallback_and_plain_pieces(tmp_path: Path) -> None:
    tk = Tokenizer(models.WordLevel({"<0xE2>": 0, "hi": 1, "<unk>": 2}, unk_token="<unk>"))
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer(tmp_path)
    assert tok.token_bytes(0) == b"\xe2"
    assert tok.token_bytes(1) == b"hi" and tok.token_bytes(99) == b""


def test_byte_level_alphabet_is_a_bijection() -> None:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    assert len(alphabet) == 256
    assert sorted(byte_level_bytes("".join(alphabet)) or b"") == list(range(256))
    assert byte_level_bytes("a b") is None  # a space is not in the alphabet
