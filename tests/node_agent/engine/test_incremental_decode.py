"""Incremental detokenization equals a full decode of the output at every step."""

from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.node_agent.engine.api import EngineRequest
from meshd.node_agent.engine.sequence import Sequence
from meshd.node_agent.engine.stopping import decode_incremental
from meshd.node_agent.engine.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=40), st.lists(st.integers(0, TOK.vocab_size - 1), max_size=12))
def test_matches_full_decode_at_every_token(text: str, extra: list[int]) -> None:
    output = TOK.encode(text, add_bos=False) + extra  # multi-byte characters and specials
    seq = Sequence(EngineRequest("r", (1, 2, 3)), None)
    for token in output:
        seq.token_ids.append(token)
        assert decode_incremental(seq, TOK) == TOK.decode(seq.output_ids)
    assert seq.read_offset <= len(output)
