"""Loop breaker: repeat storms trip at the threshold, windows slide, normal chat never trips."""

from __future__ import annotations

import random
from typing import Any

import pytest

from meshd.scheduler.admission.loops import LoopBreaker, LoopConfig, Verdict


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_breaker(**config: Any) -> tuple[LoopBreaker, FakeClock]:
    clock = FakeClock()
    return LoopBreaker(LoopConfig(**config), clock), clock


def make_verdicts(lb: LoopBreaker, clock: FakeClock, sigs: list[int], key: str = "t/u",
                  step_s: float = 1.0) -> list[Verdict | None]:
    out = []
    for sig in sigs:
        out.append(lb.check(key, sig, 100))
        lb.check_integrity()
        clock.now += step_s
    return out


@pytest.mark.parametrize("max_repeats", [2, 3, 8])
def test_duplicate_storm_trips_at_exactly_max_repeats(max_repeats: int) -> None:
    lb, clock = make_breaker(max_repeats=max_repeats)
    got = make_verdicts(lb, clock, [7] * (max_repeats + 1))
    assert got[: max_repeats - 1] == [None] * (max_repeats - 1)
    assert got[max_repeats - 1:] == [Verdict("repeat_prompt", max_repeats, 60.0),
                                     Verdict("repeat_prompt", max_repeats + 1, 60.0)]
    assert lb.stats() == {"keys": 1, "repeat_prompt": 2, "repeat_output": 0,
                          "repeat_output_recorded": 0}


def test_near_identical_prompts_share_a_signature_and_trip() -> None:
    lb, clock = make_breaker(tail_tokens=4)
    tail = [9, 9, 8, 8]
    prompts = [[i] * (i + 1) + tail for i in range(8)]  # different early context, same tail
    sigs = [lb.signature(p) for p in prompts]
    assert len(set(sigs)) == 1 and sigs[0] == hash(tuple(tail))
    assert make_verdicts(lb, clock, sigs)[-1] == Verdict("repeat_prompt", 8, 60.0)
    changed = lb.signature([*tail[:3], 7])
    assert changed != sigs[0] and lb.check("t/u", changed, 4) is None


def test_signature_of_a_short_prompt_is_the_whole_prompt() -> None:
    lb, _ = make_breaker(tail_tokens=64)
    assert lb.signature([1, 2, 3]) == hash((1, 2, 3))
    assert lb.signature(list(range(100))) == hash(tuple(range(36, 100)))


def test_window_slides_with_the_fake_clock() -> None:
    lb, clock = make_breaker()
    assert make_verdicts(lb, clock, [5] * 7) == [None] * 7  # at t = 0..6
    clock.now = 60.0  # t=0 is now exactly window_s old: out of the window
    assert lb.check("t/u", 5, 100) is None  # 1..6 and 60: seven
    clock.now = 60.5
    assert lb.check("t/u", 5, 100) == Verdict("repeat_prompt", 8, 60.0)
    clock.now = 200.0
    assert lb.check("t/u", 5, 100) is None  # all expired: the count restarts
    lb.check_integrity()


def test_keys_are_independent() -> None:
    lb, _ = make_breaker(max_repeats=2)
    assert lb.check("a", 1, 10) is None and lb.check("b", 1, 10) is None
    assert lb.check("a", 1, 10) == Verdict("repeat_prompt", 2, 60.0)


@pytest.mark.parametrize(("prompt_lens", "trips"), [
    ([100, 200, 300, 400], True),  # growing spend, same answer
    ([100, 100, 100, 100], True),  # did not shrink
    ([400, 300, 200, 100], False),  # shrinking
    ([100, 200, 150, 250], False),  # shrank once: the run is only 150, 250
    ([500, 100, 200, 300, 400], True),  # the run of four after the drop counts
    ([100, 200, 300], False),  # too few
])
def test_output_repeats_trip_only_while_prompts_grow(prompt_lens: list[int],
                                                    trips: bool) -> None:
    lb, clock = make_breaker()
    for n in prompt_lens:
        assert lb.check("k", n, n) is None  # distinct prompts: the prompt rule stays quiet
        lb.observe("k", n, 42)
        lb.check_integrity()
        clock.now += 1.0
    want = Verdict("repeat_output", 4, 60.0) if trips else None
    assert lb.check("k", 0, 1000) == want
    assert lb.stats()["repeat_output_recorded"] == (1 if trips else 0)


def test_other_outputs_in_between_do_not_break_the_run() -> None:
    lb, clock = make_breaker()
    for i, n in enumerate([100, 110, 120, 130, 140, 150, 160]):
        lb.observe("k", n, 42 if i % 2 == 0 else i)
        clock.now += 1.0
    assert lb.check("k", 0, 1) == Verdict("repeat_output", 4, 60.0)


def test_output_trip_lasts_window_s() -> None:
    lb, clock = make_breaker(max_output_repeats=2)
    lb.observe("k", 10, 42)
    clock.now = 1.0
    lb.observe("k", 20, 42)  # trips: holds while now < 61
    clock.now = 60.9
    assert lb.check("k", 1, 30) == Verdict("repeat_output", 2, 60.0)
    clock.now = 61.0
    assert lb.check("k", 2, 30) is None


def test_output_repeats_outside_the_window_do_not_count() -> None:
    lb, clock = make_breaker(max_output_repeats=2)
    lb.observe("k", 10, 42)
    clock.now = 60.0
    lb.observe("k", 20, 42)
    assert lb.check("k", 1, 30) is None


def test_fifty_turn_chat_never_trips() -> None:
    rng = random.Random(7)
    lb, clock = make_breaker(max_repeats=2, max_output_repeats=2)  # the most sensitive setting
    system = [1, 2, 3, 4] * 50
    conversation = list(system)
    template_tail = [900, 901, 902]  # "<|im_end|><|im_start|>assistant" after every user turn
    for _ in range(50):
        user = [rng.randrange(1000, 50_000) for _ in range(rng.randrange(3, 40))]
        conversation += [*user, *template_tail]
        assert lb.check("t/u", lb.signature(conversation), len(conversation)) is None
        reply = [rng.randrange(1000, 50_000) for _ in range(rng.randrange(5, 80))]
        lb.observe("t/u", len(conversation), lb.signature(reply))
        conversation += reply
        lb.check_integrity()
        clock.now += 0.5
    assert lb.stats()["repeat_prompt"] == lb.stats()["repeat_output"] == 0


def test_lru_bound_on_keys() -> None:
    lb, _ = make_breaker(max_keys=3, max_repeats=2)
    assert lb.check("a", 1, 10) is None
    for key in ["b", "c", "d"]:  # "a" is the least recently used: evicted by "d"
        assert lb.check(key, 1, 10) is None
    lb.check_integrity()
    assert lb.stats()["keys"] == 3
    assert lb.check("a", 1, 10) is None  # forgotten: its first prompt again (evicts "b")
    assert lb.check("c", 1, 10) == Verdict("repeat_prompt", 2, 60.0)


def test_history_per_key_is_bounded() -> None:
    lb, clock = make_breaker(max_repeats=2)
    assert make_verdicts(lb, clock, list(range(100)), step_s=0.01) == [None] * 100
    lb.check_integrity()  # at most 8 * max_repeats prompts remembered
    assert lb.check("t/u", 99, 1) == Verdict("repeat_prompt", 2, 60.0)
    assert lb.check("t/u", 0, 1) is None  # the oldest fell out of the bounded history


def test_disabled_never_trips_and_tracks_nothing() -> None:
    lb, clock = make_breaker(enabled=False, max_repeats=2)
    assert make_verdicts(lb, clock, [1] * 10) == [None] * 10
    lb.observe("t/u", 10, 1)
    assert lb.stats()["keys"] == 0


@pytest.mark.parametrize(("field", "value", "message"), [
    ("window_s", 0.0, "must be > 0"),
    ("max_repeats", 1, "must be >= 2"),
    ("tail_tokens", 0, "must be >= 1"),
    ("max_output_repeats", 1, "must be >= 2"),
    ("action", "drop", "must be one of log, slow, refuse \\(got 'drop'\\)"),
    ("slow_s", -1.0, "must be >= 0"),
    ("max_keys", 0, "must be >= 1"),
])
def test_config_validation_names_the_field(field: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=f"^gateway.governance.loops.{field}: {message}"):
        LoopConfig(**{field: value})


@pytest.mark.parametrize("action", ["log", "slow", "refuse"])
def test_every_action_is_accepted(action: str) -> None:
    assert LoopConfig(action=action).action == action


def test_a_long_storm_counts_up_to_the_history_and_a_passed_in_now_is_used() -> None:
    lb, clock = make_breaker(max_repeats=2, window_s=10.0, max_output_repeats=2)
    got = make_verdicts(lb, clock, [7] * 20, step_s=0.1)  # history: 8 x 2 = 16 prompts
    assert [v.count if v else 0 for v in got] == [0, *range(2, 17), 16, 16, 16, 16]
    assert lb.check("t/u", 7, 100, now=clock.now + 60.0) is None  # the history expired
    clock.now += 60.0
    lb.observe("t/u", 5, 9)
    lb.observe("t/u", 6, 9)  # two equal outputs to growing prompts: in force for window_s
    assert lb.check("t/u", 8, 100) == Verdict("repeat_output", 2, 10.0)
    assert lb.check("t/u", 8, 100, now=clock.now + 10.0) is None  # past the trip's window
