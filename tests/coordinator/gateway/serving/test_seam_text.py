"""Seamless text across a mid-stream move to another worker (byte-level tokenizer)."""

from meshd.coordinator.gateway.serving.shapes import Delta, SeamText
from meshd.node_agent.engine.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def ids(text: str) -> list[int]:
    return TOK.encode(text, add_bos=False)


def delta(tokens: list[int], finish: str | None = None, stop: str | None = None) -> Delta:
    return Delta("", tokens, None, finish, stop)


def test_a_character_split_across_workers_comes_out_whole() -> None:
    before = ids("ab") + ids("ʕ")[:1]  # the old worker held back the partial character
    pending = SeamText.pending(TOK.decode, before, "ab")
    assert pending == ids("ʕ")[:1]
    seam = SeamText(TOK.decode, pending, ())
    assert seam.feed(delta(ids("ʕ")[1:])) == "ʕ"
    assert seam.feed(delta(ids("cd"), "length")) == "cd"


def test_stop_string_is_held_back_then_cut() -> None:
    seam = SeamText(TOK.decode, [], ("END",))
    assert seam.feed(delta(ids("xyE"))) == "x"  # "yE" could start "END"
    assert seam.feed(delta(ids("N"))) == "y"  # only "EN" can still be a stop prefix
    assert seam.feed(delta(ids("D"), "stop", "END")) == ""  # cut before the stop string


def test_unalignable_history_decodes_only_new_ids() -> None:
    assert SeamText.pending(TOK.decode, ids("abc"), "zzz") == []
