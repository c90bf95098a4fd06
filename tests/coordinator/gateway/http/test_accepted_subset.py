"""What the gateway accepts, every worker accepts: field by field, boundary value by boundary
value, the gateway's `parse_chat` / `parse_completion` against the embedded engine's
`parse_request` (run here) and vLLM's rules (written out per field from vLLM's source, recent
main: `vllm/sampling_params.py` `SamplingParams._verify_args`, the OpenAI protocol models'
`Field` bounds and validators, `max_logprobs` = 20 by default, `VLLM_MAX_N_SEQUENCES` = 16384).

Left to the worker on purpose, because only the served model knows them: the context length
(`max_tokens` past what fits), token ids past the vocabulary, chat roles the template refuses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from meshd.api_errors import ApiError
from meshd.coordinator.gateway.config import Limits
from meshd.coordinator.gateway.http import openai_api
from meshd.coordinator.gateway.serving import mesh
from meshd.node_agent.engine import handlers, openai_io
from meshd.node_agent.engine.tokenizer import ByteTokenizer
from meshd.seeds import UNSEEDED, choice_seed

LIM = Limits()
MODEL = "m"
# Room for every max_tokens the gateway allows, so the context check never decides a case.
INFO = openai_io.ModelInfo(MODEL, ByteTokenizer(), max_model_len=1 << 22,
                           kv_capacity_tokens=1 << 22, vocab_size=512)
I64_MIN, I64_MAX, U64_MAX = -(2**63), 2**63 - 1, 2**64 - 1


def around(*points: int) -> list[int]:
    return sorted({q for p in points for q in (p - 1, p, p + 1)})


BOOL_VALUES: list[Any] = [True, False, None, 0, 1, "true"]
NOT_NUMBERS: list[Any] = [True, "1", [1], {}]


def vllm_bool(v: Any) -> bool:
    return v is None or type(v) is bool


# field -> (values, base fields the value needs, vLLM's rule for an accepted value, where)
Row = tuple[list[Any], dict[str, Any], Callable[[Any], bool], str]
COMMON: dict[str, Row] = {
    "seed": ([*around(I64_MIN, -1, 0, I64_MAX, U64_MAX), 1.5, 1e19, *NOT_NUMBERS], {},
             lambda v: I64_MIN <= v <= I64_MAX,
             "protocol: seed = Field(ge=torch.iinfo(torch.long).min, le=...max)"),
    "n": ([*around(0, 1, 16, LIM.max_n), 2.0, *NOT_NUMBERS], {},
          lambda v: 1 <= v <= 16384, "_verify_num_sequences: 1 <= n <= VLLM_MAX_N_SEQUENCES"),
    "max_tokens": ([*around(0, 1, LIM.max_tokens, 2**31), -2**31, 1.0, *NOT_NUMBERS], {},
                   lambda v: v >= 1, "_verify_args: max_tokens >= 1"),
    "temperature": ([-1e-9, 0, 0.0, 1e-9, 1.5, 2, 2.0, 2.0000001, 100, 100.5, *NOT_NUMBERS],
                    {}, lambda v: 0 <= v <= 2, "_verify_args: finite, in [0, 2]"),
    "top_p": ([-0.5, 0, 0.0, 5e-324, 1e-10, 1e-9, 0.5, 1, 1.0, 1.0000001, *NOT_NUMBERS], {},
              lambda v: 0 < v <= 1, "_verify_args: top_p in (0, 1]"),
    "top_k": ([*around(-1, 0, 2**31 - 1), 1.0, *NOT_NUMBERS], {},
              lambda v: v >= -1 and type(v) is int, "_verify_args: -1, 0 (off) or >= 1, an int"),
    "min_p": ([-0.1, 0, 0.5, 1, 1.1, *NOT_NUMBERS], {}, lambda v: 0 <= v <= 1,
              "_verify_args: min_p in [0, 1]"),
    "presence_penalty": ([-2.1, -2, 0, 2, 2.0, 2.1, *NOT_NUMBERS], {},
                         lambda v: -2 <= v <= 2, "_verify_args: in [-2, 2]"),
    "frequency_penalty": ([-2.1, -2, 0, 2, 2.1, *NOT_NUMBERS], {}, lambda v: -2 <= v <= 2,
                          "_verify_args: in [-2, 2]"),
    "repetition_penalty": ([-1, 0, 0.0, 1e-9, 1, 1e300, *NOT_NUMBERS], {}, lambda v: v > 0,
                           "_verify_args: finite and > 0"),
    "stop": (["", "x", [], [""], ["a", ""], ["a"] * LIM.max_stop, ["a"] * (LIM.max_stop + 1),
              [1], "x" * 1000, 5, {}], {},
             lambda v: all(isinstance(s, str) and s for s in ([v] if isinstance(v, str) else v)),
             "_verify_args: stop cannot contain an empty string"),
    "stop_token_ids": ([[], [0], [2**31 - 1], [2**31], [-1], [1.0], [True], "1", 3], {},
                       lambda v: all(type(t) is int for t in v),
                       "_verify_args: stop_token_ids must contain only integers"),
    "logit_bias": ([{}, {"5": 1.5}, {"5": -200}, {"x": 1}, {"5": "a"}, [1], "x"], {},
                   lambda v: all(k.isdigit() for k in v),
                   "from_optional: keys convertible to int token ids (biases clamped)"),
    "stream": (BOOL_VALUES, {}, vllm_bool, "protocol: stream: bool"),
    "stream_options": ([{"include_usage": True}, {"include_usage": False}, {},
                        {"include_usage": 1}, [], "x"], {"stream": True},
                       lambda v: isinstance(v, dict), "protocol: StreamOptions"),
    "ignore_eos": (BOOL_VALUES, {}, vllm_bool, "protocol: bool"),
    "include_stop_str_in_output": (BOOL_VALUES, {}, vllm_bool, "protocol: bool"),
    "return_token_ids": (BOOL_VALUES, {}, vllm_bool, "protocol: bool"),
    "return_tokens_as_token_ids": (BOOL_VALUES, {}, vllm_bool, "protocol: bool"),
    "user": (["u", "", 5, None], {}, lambda v: v is None or isinstance(v, str), "str"),
}
CHAT_ONLY: dict[str, Row] = {
    "max_completion_tokens": ([*around(0, 1, LIM.max_tokens), 1.0, *NOT_NUMBERS], {},
                              lambda v: v >= 1, "_verify_args: max_tokens >= 1"),
    "logprobs": (BOOL_VALUES, {}, vllm_bool, "chat protocol: logprobs: bool"),
    "top_logprobs": ([*around(0, LIM.max_logprobs), -1, 1.0, *NOT_NUMBERS],
                     {"logprobs": True}, lambda v: 0 <= v <= 20,
                     "chat: top_logprobs >= 0 (-1: all) and <= max_logprobs (20)"),
    "messages": ([[], "hi", [{"role": "user", "content": ""}],
                  [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
                  [{"role": "user", "content": 5}], [{"content": "x"}]], {},
                 lambda v: bool(v), "a non-empty list of messages"),
}
COMPLETION_ONLY: dict[str, Row] = {
    "logprobs": ([*around(0, 5, LIM.max_logprobs), 1.0, *NOT_NUMBERS], {},
                 lambda v: 0 <= v <= 20, "completions: logprobs >= 0 and <= max_logprobs (20)"),
    # ids within this model's vocabulary: one past it is the model's to refuse
    "prompt": (["", "x", [], [0], [INFO.vocab_size - 1], [-1], ["a"], [True], 5, None], {},
               lambda v: bool(v), "a non-empty string or token ids"),
}
# What the engine refuses although the gateway (and vLLM) accept it: a capability the engine
# lacks, answered with a clear "not supported" 400 by the engine.
ENGINE_GAPS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "min_tokens": (lambda v: v > 0, "not supported"),
}
GAP_ROWS: dict[str, Row] = {
    "min_tokens": ([*around(0, 1, 16), 1.0, *NOT_NUMBERS], {"max_tokens": 16},
                   lambda v: 0 <= v <= 16, "_verify_args: 0 <= min_tokens <= max_tokens"),
}


def base(chat: bool) -> dict[str, Any]:
    if chat:
        return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    return {"model": MODEL, "prompt": "hi"}


def outcome(fn: Callable[[], Any]) -> ApiError | None:
    """None if accepted, the ApiError if refused; anything else raised fails the test."""
    try:
        fn()
    except ApiError as e:
        assert e.status == 400 and e.message, e
        return e
    return None


def cases() -> list[tuple[bool, str, Any, dict[str, Any], Callable[[Any], bool], str]]:
    out = []
    for chat, own in ((True, CHAT_ONLY), (False, COMPLETION_ONLY)):
        for name, (values, extra, rule, where) in {**COMMON, **GAP_ROWS, **own}.items():
            out += [(chat, name, v, extra, rule, where) for v in values]
    return out


def case_id(c: tuple[Any, ...]) -> str:
    return f"{'chat' if c[0] else 'completion'}-{c[1]}={c[2]!r:.24}"


CASES = cases()


@pytest.mark.parametrize(("chat", "name", "value", "extra", "vllm_rule", "where"), CASES,
                         ids=[case_id(c) for c in CASES])
def test_gateway_accepts_only_what_workers_accept(chat: bool, name: str, value: Any,
                                                  extra: dict[str, Any],
                                                  vllm_rule: Callable[[Any], bool],
                                                  where: str) -> None:
    body = {**base(chat), **extra, name: value}
    parse = openai_api.parse_chat if chat else openai_api.parse_completion
    gw = outcome(lambda: parse(body, LIM))
    engine = outcome(lambda: openai_io.parse_request(body, chat, INFO))
    if gw is not None:
        assert gw.param == name or gw.param is None or gw.param.startswith(name), gw
        return
    if value is not None:
        assert vllm_rule(value), f"gateway accepts {name}={value!r}; vLLM refuses it ({where})"
    gap = ENGINE_GAPS.get(name)
    if gap is not None and gap[0](value):
        assert engine is not None and gap[1] in engine.message
        return
    assert engine is None, f"gateway accepts {name}={value!r}; the engine refuses: {engine}"


def test_every_field_has_accepted_and_refused_values() -> None:
    """The table is not vacuous: each field has a value the gateway takes and one it refuses."""
    seen: dict[tuple[bool, str], set[bool]] = {}
    for chat, name, value, extra, _, _ in CASES:
        parse = openai_api.parse_chat if chat else openai_api.parse_completion
        body = {**base(chat), **extra, name: value}
        ok = outcome(lambda p=parse, b=body: p(b, LIM)) is None  # type: ignore[misc]
        seen.setdefault((chat, name), set()).add(ok)
    assert all(v == {True, False} for v in seen.values()), [k for k, v in seen.items()
                                                            if v != {True, False}]


SEEDS = [I64_MIN, I64_MIN + 1, -128, -3, -2, 0, 1, I64_MAX - 127, I64_MAX - 1, I64_MAX]


@pytest.mark.parametrize("seed", SEEDS)
def test_choice_seeds_stay_int64_distinct_and_match_the_engine(seed: int) -> None:
    n = LIM.max_n
    seeds = [choice_seed(seed, i) for i in range(n)]
    assert seeds[0] == seed and len(set(seeds)) == n
    assert all(I64_MIN <= s <= I64_MAX for s in seeds)
    assert UNSEEDED not in seeds[1:]  # vLLM would read -1 as "no seed"
    assert mesh.choice_seed is handlers.choice_seed is choice_seed  # both front ends: one rule
    for s in seeds:  # what each choice's worker request carries, accepted by the engine
        assert openai_io.parse_request({**base(False), "seed": s}, False, INFO).sampling.seed \
            == (None if s == -1 else s)


def test_choice_seed_of_the_reported_overflow() -> None:
    """seed = 2^63 - 127, n = 128 made choice 127 send 2^63 (vLLM: 400)."""
    assert choice_seed(I64_MAX - 126, 127) == I64_MIN
    assert choice_seed(-2, 1) == 0 and choice_seed(-3, 1) == -2
    assert choice_seed(-3, 2) == 0  # steps over -1


def test_seed_minus_one_means_unseeded_on_both() -> None:
    req = openai_api.parse_completion({**base(False), "seed": -1, "n": 3}, LIM)
    assert req.sampling.seed is None
    assert openai_io.parse_request({**base(False), "seed": -1}, False, INFO).sampling.seed is None
