"""The engine's OpenAI request parsing and logprobs shapes, without a server."""

from __future__ import annotations

from typing import Any

import pytest

from meshd.api_errors import ApiError
from meshd.node_agent.engine.api import TokenLogprob
from meshd.node_agent.engine.openai_io import (
    ModelInfo,
    logprobs_chat,
    logprobs_completion,
    parse_request,
)
from meshd.node_agent.engine.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
INFO = ModelInfo("m", TOK, max_model_len=256, kv_capacity_tokens=1024, vocab_size=512)
# 0x80 and 0x81 are both a lone continuation byte: each decodes to U+FFFD
ALIKE = TokenLogprob(0x80, -0.5, ((0x80, -0.5), (0x81, -1.0), (ord("a"), -2.0)))
PARTIAL = TokenLogprob(0xE2, -0.1, ((0xE2, -0.1),))


def test_completion_form_by_text_merges_alike_tokens_by_id_keeps_them() -> None:
    by_text, end = logprobs_completion(TOK, [ALIKE, PARTIAL], offset=4)
    assert by_text["tokens"] == ["\ufffd", "\ufffd"]
    assert by_text["top_logprobs"][0] == {"\ufffd": -0.5, "a": -2.0}  # OpenAI's form: by text
    assert by_text["text_offset"] == [4, 5] and end == 6
    by_id, end = logprobs_completion(TOK, [ALIKE, PARTIAL], offset=4, as_ids=True)
    assert by_id["tokens"] == ["token_id:128", "token_id:226"]
    assert by_id["top_logprobs"][0] == {"token_id:128": -0.5, "token_id:129": -1.0,
                                        "token_id:97": -2.0}
    assert by_id["text_offset"] == [4, 5] and end == 6  # offsets count text, not names


@pytest.mark.parametrize("as_ids", [False, True])
def test_chat_form_bytes_are_the_tokens_own(as_ids: bool) -> None:
    out = logprobs_chat(TOK, [ALIKE, PARTIAL], as_ids)
    first, second = out["content"]
    assert [t["bytes"] for t in first["top_logprobs"]] == [[0x80], [0x81], [0x61]]
    assert second["bytes"] == [0xE2] and second["logprob"] == -0.1
    names = [t["token"] for t in first["top_logprobs"]]
    assert names == (["token_id:128", "token_id:129", "token_id:97"] if as_ids
                     else ["\ufffd", "\ufffd", "a"])


def make(**kw: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": "hi", **kw}


def test_flags_and_defaults() -> None:
    r = parse_request(make(return_tokens_as_token_ids=True, seed=-1, top_p=1e-12), False, INFO)
    assert r.return_tokens_as_token_ids and r.sampling.seed is None
    assert r.sampling.top_p == 1e-12
    assert not parse_request(make(), False, INFO).return_tokens_as_token_ids


def test_completions_ignore_max_completion_tokens_chat_reads_it() -> None:
    assert parse_request(make(max_tokens=3, max_completion_tokens=7), False,
                         INFO).sampling.max_tokens == 3
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
            "max_completion_tokens": 7}
    assert parse_request(chat, True, INFO).sampling.max_tokens == 7


def test_text_parts_join_with_newlines_like_the_gateway() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    joined = parse_request({"messages": [{"role": "user", "content": parts}]}, True, INFO)
    plain = parse_request({"messages": [{"role": "user", "content": "a\nb"}]}, True, INFO)
    assert joined.prompt == plain.prompt


@pytest.mark.parametrize(("body", "param"), [
    (make(return_tokens_as_token_ids=1), "return_tokens_as_token_ids"),
    (make(top_p=0.0), "top_p"),
    (make(stop=""), "stop"),
    (make(seed=2**63), "seed"),
    (make(repetition_penalty=0), "repetition_penalty"),
    (make(min_p=1.5), "min_p"),
    (make(frequency_penalty=-3), "frequency_penalty"),
    (make(n=129), "n"),
    (make(temperature=10**300), "temperature"),
    # structured output: refused, never silently ignored (the engine does not constrain)
    (make(response_format={"type": "json_object"}), "response_format"),
    (make(response_format="json"), "response_format"),
    (make(guided_json={"type": "object"}), "guided_json"),
    (make(structured_outputs={"json": {}}), "structured_outputs"),
])
def test_refused(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as ei:
        parse_request(body, False, INFO)
    assert ei.value.status == 400 and ei.value.param == param


def test_plain_text_response_format_is_accepted() -> None:
    assert parse_request(make(response_format={"type": "text"}), False, INFO).prompt
