"""Worker logprobs keyed by token id (`return_tokens_as_token_ids`) -> the client's logprobs.

The worker side is the embedded engine's own `logprobs_completion(..., as_ids=True)` (what a
worker sends); the tokenizer is meshd's byte tokenizer, where every lone byte >= 0x80 decodes
to U+FFFD, so "two ids that decode alike" and "a partial UTF-8 token" are everyday cases.
Results are checked against the `openai` SDK's own types.
"""

from __future__ import annotations

from typing import Any

import openai.types as ot
import openai.types.chat as oc
import orjson
import pytest
from openai.types.completion_choice import Logprobs

from meshd.coordinator.gateway.config import Limits
from meshd.coordinator.gateway.http.api_request import ApiRequest, Endpoint
from meshd.coordinator.gateway.http.openai_api import parse_chat, parse_completion
from meshd.coordinator.gateway.serving.shapes import (
    ChoiceOutput,
    Delta,
    Shaper,
    TokenVocab,
    chat_logprobs,
    completion_logprobs,
    usage,
)
from meshd.node_agent.engine.api import TokenLogprob
from meshd.node_agent.engine.openai_io import logprobs_completion
from meshd.node_agent.engine.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
VOCAB = TokenVocab(TOK.decode, TOK.token_bytes)
A, B, Z = ord("a"), ord("b"), ord("z")


def make_worker_lp(*lps: TokenLogprob) -> dict[str, Any]:
    return logprobs_completion(TOK, lps, as_ids=True)[0]


def tops(out: dict[str, Any] | None) -> list[list[tuple[str, float, list[int]]]]:
    assert out is not None
    return [[(t["token"], t["logprob"], t["bytes"]) for t in c["top_logprobs"]]
            for c in out["content"]]


# (case, worker logprobs, top_n, expected top_logprobs per position)
CHAT_CASES: list[tuple[str, dict[str, Any], int, list[list[tuple[str, float, list[int]]]]]] = [
    ("two ids that decode alike stay two",
     make_worker_lp(TokenLogprob(0x80, -0.5, ((0x80, -0.5), (0x81, -1.0), (A, -2.0)))), 3,
     [[("\ufffd", -0.5, [0x80]), ("\ufffd", -1.0, [0x81]), ("a", -2.0, [A])]]),
    ("a partial UTF-8 token keeps its byte",
     make_worker_lp(TokenLogprob(0xE2, -0.1, ((0xE2, -0.1), (0xC3, -0.3)))), 2,
     [[("\ufffd", -0.1, [0xE2]), ("\ufffd", -0.3, [0xC3])]]),
    ("a sampled token outside the top is not an alternative",
     make_worker_lp(TokenLogprob(Z, -3.0, ((A, -0.1), (B, -0.2)))), 2,
     [[("a", -0.1, [A]), ("b", -0.2, [B])]]),
    ("exactly top_n of what the worker sent, highest first",
     {"tokens": ["token_id:122"], "token_logprobs": [-3.0],
      "top_logprobs": [{"token_id:122": -3.0, "token_id:98": -0.2, "token_id:97": -0.1}]}, 2,
     [[("a", -0.1, [A]), ("b", -0.2, [B])]]),
    ("top_logprobs 0: none", make_worker_lp(TokenLogprob(A, -0.1, ())), 0, [[]]),
    ("special tokens: no text, no bytes", make_worker_lp(TokenLogprob(257, -0.2, ((257, -0.2),
                                                                                  (258, -0.9)))),
     2, [[("", -0.2, []), ("", -0.9, [])]]),
    ("names from a worker without the flag are the text",
     {"tokens": ["a"], "token_logprobs": [-0.1], "top_logprobs": [{"a": -0.1, "b": -0.4}]}, 2,
     [[("a", -0.1, [A]), ("b", -0.4, [B])]]),
]


@pytest.mark.parametrize(("case", "worker", "top_n", "expected"), CHAT_CASES,
                         ids=[c[0] for c in CHAT_CASES])
def test_chat_logprobs(case: str, worker: dict[str, Any], top_n: int,
                       expected: list[list[tuple[str, float, list[int]]]]) -> None:
    out = chat_logprobs(worker, top_n, VOCAB)
    assert tops(out) == expected
    assert out is not None
    for c, name in zip(out["content"], worker["tokens"], strict=True):
        tid = int(name.removeprefix("token_id:")) if name.startswith("token_id:") else ord(name)
        assert (c["token"], c["bytes"]) == (TOK.decode([tid]), list(TOK.token_bytes(tid)))


def test_chat_logprobs_as_ids_keeps_the_names() -> None:
    worker = make_worker_lp(TokenLogprob(0x80, -0.5, ((0x80, -0.5), (0x81, -1.0))))
    out = chat_logprobs(worker, 2, VOCAB, as_ids=True)
    assert tops(out) == [[("token_id:128", -0.5, [0x80]), ("token_id:129", -1.0, [0x81])]]


def test_completion_logprobs_by_text_and_offsets() -> None:
    worker = make_worker_lp(TokenLogprob(0x80, -0.5, ((0x80, -0.5), (0x81, -1.0), (A, -2.0))),
                            TokenLogprob(A, -0.1, ((A, -0.1),)))
    out, end = completion_logprobs(worker, VOCAB, offset=3)
    assert out == {"tokens": ["\ufffd", "a"], "token_logprobs": [-0.5, -0.1],
                   "top_logprobs": [{"\ufffd": -0.5, "a": -2.0}, {"a": -0.1}],
                   "text_offset": [3, 4]}
    assert end == 5
    assert completion_logprobs(None, VOCAB, 7) == (None, 7)


def make_req(chat: bool, **kw: Any) -> ApiRequest:
    if chat:
        body: Any = parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                **kw}, Limits())
    else:
        body = parse_completion({"model": "m", "prompt": "x", **kw}, Limits())
    return ApiRequest(Endpoint.CHAT if chat else Endpoint.COMPLETIONS, "r1", body, {}, b"",
                      None, 0.0)


ALIKE = TokenLogprob(0x80, -0.5, ((0x80, -0.5), (0x81, -1.0), (A, -2.0)))
PARTIAL = TokenLogprob(0xE2, -0.7, ((A, -0.1), (B, -0.2), (0xE2, -0.7)))


def make_output(*lps: TokenLogprob) -> ChoiceOutput:
    parts = [make_worker_lp(x) for x in lps]
    return ChoiceOutput(text=["\ufffd" * len(lps)], token_ids=[x.token_id for x in lps],
                        logprobs=parts, finish_reason="length")


def test_chat_body_and_chunk_parse_with_the_openai_sdk() -> None:
    shaper = Shaper(make_req(True, logprobs=True, top_logprobs=3), created=1, vocab=VOCAB)
    outs = [make_output(ALIKE, PARTIAL)]
    body = oc.ChatCompletion.model_validate(orjson.loads(shaper.body(outs, usage(3, outs))))
    lp = body.choices[0].logprobs
    assert lp is not None and lp.content is not None
    assert [len(t.top_logprobs) for t in lp.content] == [3, 3]
    assert [t.bytes for t in lp.content[0].top_logprobs] == [[0x80], [0x81], [A]]
    assert lp.content[1].bytes == [0xE2] and lp.content[1].token == "\ufffd"
    chunk = oc.ChatCompletionChunk.model_validate(orjson.loads(shaper.chunk(
        0, Delta("\ufffd", [0x80], make_worker_lp(ALIKE), None))))
    clp = chunk.choices[0].logprobs
    assert clp is not None and clp.content is not None
    assert [t.logprob for t in clp.content[0].top_logprobs] == [-0.5, -1.0, -2.0]


def test_completion_stream_offsets_run_across_chunks_and_parse() -> None:
    shaper = Shaper(make_req(False, logprobs=2, stream=True), created=1, vocab=VOCAB)

    def logprobs(d: Delta) -> Logprobs:  # the SDK reads stream chunks without validating
        return Logprobs.model_validate(orjson.loads(shaper.chunk(0, d))["choices"][0]["logprobs"])

    first = logprobs(Delta("ab", [A, B], make_worker_lp(TokenLogprob(A, -0.1, ((A, -0.1),)),
                                                        TokenLogprob(B, -0.2, ((B, -0.2),))),
                           None))
    second = logprobs(Delta("\ufffd", [0x80], make_worker_lp(ALIKE), "length"))
    assert first.text_offset == [0, 1] and second.text_offset == [2]
    assert second.tokens == ["\ufffd"] and second.top_logprobs == [{"\ufffd": -0.5, "a": -2.0}]
    full = Shaper(make_req(False, logprobs=3), created=1, vocab=VOCAB)
    outs = [make_output(ALIKE, PARTIAL)]
    body = ot.Completion.model_validate(orjson.loads(full.body(outs, usage(3, outs))))
    lp = body.choices[0].logprobs
    assert lp is not None and lp.text_offset == [0, 1] and lp.tokens == ["\ufffd", "\ufffd"]


def test_without_a_vocab_the_old_shapes_hold() -> None:
    """Until the handler passes the tokenizer, string-keyed worker logprobs pass as before."""
    shaper = Shaper(make_req(True, logprobs=True, top_logprobs=1), created=1)
    worker = {"tokens": ["a"], "token_logprobs": [-0.1], "top_logprobs": [{"a": -0.1}]}
    out = orjson.loads(shaper.chunk(0, Delta("a", [A], worker, None)))
    assert out["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == [
        {"token": "a", "logprob": -0.1, "bytes": [A]}]
