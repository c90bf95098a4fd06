"""Anthropic `cache_control` as a prefix-routing hint: the prompt builder finds the hinted
prefix's length in the rendered prompt exactly, and the prefix scorer judges locality on it."""

from __future__ import annotations

import pytest

from meshd.coordinator.gateway.config import Limits
from meshd.coordinator.gateway.http.api_request import ApiRequest, Endpoint
from meshd.coordinator.gateway.http.dialect_requests import parse_messages
from meshd.coordinator.gateway.serving.prompts import PromptBuilder
from meshd.node_agent.engine.tokenizer import ByteTokenizer
from meshd.scheduler.scorers import PrefixScorer
from meshd.scheduler.types import RequestView, WorkerView

EPH = {"type": "ephemeral"}
DOC = "A long shared document. " * 8


def make_request(system: object, user: object) -> ApiRequest:
    obj = {"model": "m", "max_tokens": 4, "system": system,
           "messages": [{"role": "user", "content": user}]}
    body, dialect = parse_messages(obj, Limits())
    return ApiRequest(Endpoint.MESSAGES, "r", body, obj, b"", None, 0.0, dialect=dialect)


@pytest.mark.parametrize(("system", "user", "want"), [
    # no hint: 0
    (DOC, "question?", lambda t: 0),
    # the system prompt marked: exactly its rendering
    ([{"type": "text", "text": DOC, "cache_control": EPH}], "question?",
     lambda t: len(t.apply_chat_template([{"role": "system", "content": DOC}],
                                         add_generation_prompt=False))),
    # the user turn marked too: everything but the generation prompt
    ([{"type": "text", "text": DOC, "cache_control": EPH}],
     [{"type": "text", "text": "question?", "cache_control": EPH}],
     lambda t: len(t.apply_chat_template([{"role": "system", "content": DOC},
                                          {"role": "user", "content": "question?"}],
                                         add_generation_prompt=False))),
])
def test_the_hinted_prefix_is_measured_in_the_rendered_prompt(system: object, user: object,
                                                              want: object) -> None:
    prompt = PromptBuilder().build(make_request(system, user), 16)
    expected = want(ByteTokenizer())  # type: ignore[operator]
    assert prompt.cache_hint_tokens == expected
    assert prompt.cache_hint_tokens < len(prompt.token_ids)
    if expected:  # a true prefix of what the worker receives
        head = ByteTokenizer().apply_chat_template([{"role": "system", "content": DOC}],
                                                   add_generation_prompt=False)
        assert list(prompt.token_ids[:len(head)]) == head


def test_the_prefix_scorer_judges_locality_on_the_hinted_prefix() -> None:
    workers = [WorkerView("a", "both", "m"), WorkerView("b", "both", "m")]
    plain = RequestView("r", "m", 320, tuple(range(20)), cached_blocks={"a": 10, "b": 5})
    hinted = RequestView("r", "m", 320, tuple(range(20)), cached_blocks={"a": 10, "b": 5},
                         cache_hint_tokens=160)
    assert PrefixScorer().score(plain, workers) == {"a": 0.5, "b": 0.25}
    assert PrefixScorer().score(hinted, workers) == {"a": 1.0, "b": 0.5}
