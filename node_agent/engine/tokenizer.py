"""Tokenizers for the embedded engine.

`load_tokenizer(path, vocab_size)`: a HF `tokenizers` tokenizer from `path/tokenizer.json` if
present, else `ByteTokenizer` (ids 0..255 are bytes, then special tokens). Both implement the
`Tokenizer` protocol: `encode`, `decode` (special tokens skipped), `token_bytes` (one token's raw
bytes, for logprobs), `apply_chat_template` (messages in the Hugging Face convention and the
OpenAI tool list, chat_format.py: the model's own template if it has one, else meshd's
built-in format).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from meshd.node_agent.engine.chat_format import ChatTemplate, Message, ToolSpecs
from meshd.node_agent.engine.chat_format import chat_text as _chat_text

SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|end|>")


class Tokenizer(Protocol):
    """Text <-> token ids. `decode` never raises on partial UTF-8 (it yields U+FFFD)."""

    bos_token_id: int | None
    eos_token_id: int | None

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes `token_id` adds to decoded text, whole even where they are not valid
        UTF-8 alone (a byte-level BPE token holding part of a character): decoding the
        concatenated bytes of a sequence of tokens gives `decode` of that sequence. Special
        tokens (skipped by `decode`) and unknown ids give b""."""
        ...

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                            *, tools: ToolSpecs | None = None) -> list[int]:
        """The prompt's ids; ValueError for messages or tools the template cannot render."""
        ...


class ByteTokenizer:
    """Byte-level tokenizer: id b for byte b, 256.. for SPECIAL_TOKENS.

    Chat template: `<bos>` then `<|role|>content<|end|>` per message, then `<|assistant|>`.
    """

    def __init__(self) -> None:
        self.special = {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)}
        self.bos_token_id: int | None = self.special["<bos>"]
        self.eos_token_id: int | None = self.special["<eos>"]
        self.end_token_id = self.special["<|end|>"]
        self.vocab_size = 256 + len(SPECIAL_TOKENS)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Bytes of `text`; special-token strings in the text become their ids."""
        out = [self.special["<bos>"]] if add_bos else []
        i = 0
        while i < len(text):
            if text[i] == "<":
                tok = next((t for t in SPECIAL_TOKENS if text.startswith(t, i)), None)
                if tok is not None:
                    out.append(self.special[tok])
                    i += len(tok)
                    continue
            j = text.find("<", i + 1)
            j = len(text) if j < 0 else j
            out.extend(text[i:j].encode("utf-8"))
            i = j
        return out

    def decode(self, token_ids: Sequence[int]) -> str:
        return bytes(t for t in token_ids if 0 <= t < 256).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return bytes((token_id,)) if 0 <= token_id < 256 else b""

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                            *, tools: ToolSpecs | None = None) -> list[int]:
        return self.encode(_chat_text(messages, add_generation_prompt, tools), add_bos=True)


def _token_text(tok: object) -> str:
    if isinstance(tok, dict):
        tok = tok.get("content")
    return tok if isinstance(tok, str) else ""


def _template_source(cfg: Mapping[str, object]) -> str | None:
    """`chat_template` from tokenizer_config.json: a string, or a list of {name, template}
    (the one named "default" is used, as transformers does)."""
    t = cfg.get("chat_template")
    if isinstance(t, str) and t:
        return t
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        default = named.get("default")
        return default if isinstance(default, str) and default else None
    return None


def _gpt2_byte_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: printable Latin-1 bytes stand for themselves,
    the other 68 bytes for the code points 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    kept = set(keep)
    out = {chr(b): b for b in keep}
    extra = 256
    for b in range(256):
        if b not in kept:
            out[chr(extra)] = b
            extra += 1
    return out


_BYTE_CHARS = _gpt2_byte_chars()


def byte_level_bytes(piece: str) -> bytes | None:
    """The bytes a byte-level BPE token string stands for; None if it is not one."""
    try:
        return bytes(_BYTE_CHARS[c] for c in piece)
    except KeyError:
        return None


def _is_byte_level(decoder: object) -> bool:
    if not isinstance(decoder, dict):
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    parts = decoder.get("decoders") if decoder.get("type") == "Sequence" else None
    return isinstance(parts, list) and any(_is_byte_level(d) for d in parts)


class HFTokenizer:
    """Wraps `tokenizers.Tokenizer` from a local `tokenizer.json`.

    Chat: with a `chat_template` in `tokenizer_config.json` the model's own template is rendered
    (jinja2) and the text encoded without adding special tokens — what vLLM and transformers do;
    without one, meshd's built-in template text (as `ByteTokenizer`)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(path / "tokenizer.json"))
        spec = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        self._byte_level = _is_byte_level(spec.get("decoder"))
        self._special_ids = frozenset(t["id"] for t in spec.get("added_tokens") or ()
                                      if isinstance(t, dict) and t.get("special"))
        cfg_path = path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.bos_token_id = self._id(cfg.get("bos_token"))
        self.eos_token_id = self._id(cfg.get("eos_token"))
        source = _template_source(cfg)
        special = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token",
                                                        "pad_token")}
        self.chat_template = ChatTemplate(source, special) if source else None

    def _id(self, tok: object) -> int | None:
        text = _token_text(tok)
        return self._tok.token_to_id(text) if text else None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids: list[int] = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(token_ids), skip_special_tokens=True))

    def token_bytes(self, token_id: int) -> bytes:
        """Byte-level BPE (GPT-2 style): the token's characters mapped back to bytes;
        SentencePiece byte fallback `<0xNN>`: that byte; otherwise the decoded text."""
        piece = self._tok.id_to_token(token_id)
        if piece is None or token_id in self._special_ids:
            return b""
        if self._byte_level:
            raw = byte_level_bytes(piece)
            if raw is not None:
                return raw
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes((int(piece[3:5], 16),))
            except ValueError:
                pass
        return self.decode([token_id]).encode("utf-8")

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                            *, tools: ToolSpecs | None = None) -> list[int]:
        if self.chat_template is not None:
            text = self.chat_template.render(messages, add_generation_prompt, tools=tools)
            return self.encode(text, add_bos=False)
        return self.encode(_chat_text(messages, add_generation_prompt, tools), add_bos=True)


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """HFTokenizer if `path/tokenizer.json` exists, else ByteTokenizer."""
    if path and (Path(path) / "tokenizer.json").exists():
        return HFTokenizer(Path(path))
    return ByteTokenizer()
