"""Runaway agent-loop breaker: spot a key (tenant, or tenant/user) stuck repeating itself.

Two rules, each over a sliding window of `window_s`:
- repeat_prompt: the same prompt signature (hash of the last `tail_tokens` token ids) seen
  `max_repeats` times, this one included. A growing conversation changes its tail every turn,
  so ordinary multi-turn chat never matches; an agent re-sending the same step does, even when
  its early context differs.
- repeat_output: the same completion signature produced `max_output_repeats` times while the
  prompt length never shrank between them (token spend growing for the same answer). Recorded
  by `observe` at the end of a request; `check` reports it for `window_s` afterwards.

Plain data: the clock is passed in (monotonic), no I/O. `check` runs on every request and is
O(1) amortized: per key a bounded deque of recent prompts plus a count per signature. The
verdict only says what tripped; the gateway applies `LoopConfig.action`.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

REPEAT_PROMPT = "repeat_prompt"
REPEAT_OUTPUT = "repeat_output"
ACTIONS = ("log", "slow", "refuse")
# Per key, the prompts (outputs) remembered: this many times max_repeats (max_output_repeats).
# A key sending more than that within the window forgets its oldest entries first.
HISTORY_FACTOR = 8


@dataclass(frozen=True, slots=True)
class LoopConfig:
    enabled: bool = True
    window_s: float = 60.0
    max_repeats: int = 8  # near-identical prompts within window_s that trip the rule
    tail_tokens: int = 64  # prompts are near-identical when their last tail_tokens ids match
    max_output_repeats: int = 4  # identical completions within window_s while prompts grow
    action: str = "log"  # "log" | "slow" | "refuse", applied by the gateway
    slow_s: float = 2.0  # delay applied with action "slow"
    max_keys: int = 10_000  # LRU bound on tracked keys

    def __post_init__(self) -> None:
        rules = (
            ("window_s", 0 < self.window_s < float("inf"), "> 0 and finite"),
            ("max_repeats", self.max_repeats >= 2, ">= 2"),
            ("tail_tokens", self.tail_tokens >= 1, ">= 1"),
            ("max_output_repeats", self.max_output_repeats >= 2, ">= 2"),
            ("action", self.action in ACTIONS, "one of " + ", ".join(ACTIONS)),
            ("slow_s", 0 <= self.slow_s < float("inf"), ">= 0 and finite"),
            ("max_keys", self.max_keys >= 1, ">= 1"),
        )
        for name, ok, rule in rules:
            if not ok:
                got = getattr(self, name)
                raise ValueError(f"gateway.governance.loops.{name}: must be {rule} (got {got!r})")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What tripped. A dataclass, not a NamedTuple: a `count` field would shadow tuple.count.
    `check` returns shared instances made once (a verdict may hold on every request)."""

    rule: str  # REPEAT_PROMPT | REPEAT_OUTPUT
    count: int  # repeats seen within the window when it tripped
    window_s: float


class _KeyState:
    __slots__ = ("counts", "outputs", "prompts", "trip_count", "trip_until")

    def __init__(self) -> None:
        self.prompts: deque[tuple[float, int]] = deque()  # (time, prompt signature), oldest first
        self.counts: dict[int, int] = {}  # prompt signature -> occurrences in `prompts`
        # output sig -> (times of its current run, newest last; the run's last prompt length)
        self.outputs: dict[int, tuple[deque[float], int]] = {}
        self.trip_until = float("-inf")  # a repeat_output trip holds while now < trip_until
        self.trip_count = 0


class LoopBreaker:
    """Per-key loop detection. `check` at admission, `observe` when the request ends."""

    def __init__(self, config: LoopConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self._clock = clock
        self._keys: OrderedDict[str, _KeyState] = OrderedDict()  # LRU order
        self._prompt_cap = HISTORY_FACTOR * config.max_repeats
        self._window, self._max_repeats = config.window_s, config.max_repeats  # hot path
        self._tail = config.tail_tokens
        self._output_cap = HISTORY_FACTOR * config.max_output_repeats
        self._max_output = config.max_output_repeats
        # the verdicts `check` can return, by count: a key's history holds at most
        # `_prompt_cap` prompts and an output run at most `max_output_repeats` times
        self._prompt_verdicts = [Verdict(REPEAT_PROMPT, n, config.window_s)
                                 for n in range(self._prompt_cap + 1)]
        self._output_verdicts = [Verdict(REPEAT_OUTPUT, n, config.window_s)
                                 for n in range(self._max_output + 1)]
        self._prompt_trips = self._output_trips = 0  # verdicts returned by check, per rule
        self._recorded = 0  # repeat_output trips recorded by observe

    def signature(self, token_ids: Sequence[int]) -> int:
        """Signature of a prompt or completion: a hash of its last `tail_tokens` token ids.
        Integer-tuple hashes do not depend on PYTHONHASHSEED."""
        tail = self._tail
        return hash(tuple(token_ids) if len(token_ids) <= tail else tuple(token_ids[-tail:]))

    def check(self, key: str, prompt_sig: int, prompt_len: int,
              now: float | None = None) -> Verdict | None:
        """Record this prompt for `key` and return what tripped, or None. The prompt rule is
        judged first (this prompt included); else a repeat_output trip still in force.
        `prompt_len` is not used by either rule here (observe gets the length it judges);
        `now`: the clock's time, when the caller has just read it."""
        if not self.config.enabled:
            return None
        if now is None:
            now = self._clock()
        st = self._keys.get(key)  # _state(key), inlined: this runs on every request
        if st is None:
            st = self._state(key)
        else:
            self._keys.move_to_end(key)
        prompts, counts = st.prompts, st.counts
        cutoff, cap = now - self._window, self._prompt_cap
        while prompts and (prompts[0][0] <= cutoff or len(prompts) >= cap):
            old = prompts.popleft()[1]
            left = counts[old] - 1
            if left:
                counts[old] = left
            else:
                del counts[old]
        prompts.append((now, prompt_sig))
        count = counts[prompt_sig] = counts.get(prompt_sig, 0) + 1
        if count >= self._max_repeats:
            self._prompt_trips += 1
            return self._prompt_verdicts[count]
        if now < st.trip_until:
            self._output_trips += 1
            return self._output_verdicts[st.trip_count]
        return None

    def observe(self, key: str, prompt_len: int, output_sig: int) -> None:
        """Record a finished request's completion. Trips repeat_output for `window_s` when this
        output_sig is now the latest of `max_output_repeats` equal outputs within the window,
        each with a prompt at least as long as the one before it. O(1): each output
        signature keeps its own run (at most `max_output_repeats` times)."""
        if not self.config.enabled:
            return
        now = self._clock()
        st = self._keys.get(key)  # _state(key), inlined
        if st is None:
            st = self._state(key)
        else:
            self._keys.move_to_end(key)
        outputs = st.outputs
        entry = outputs.pop(output_sig, None)  # re-inserted last: the dict is oldest-first
        if entry is None or prompt_len < entry[1]:  # new, or the prompt shrank: a new run
            times: deque[float] = deque(maxlen=self._max_output)
        else:
            times = entry[0]
        times.append(now)
        cutoff = now - self._window
        while times[0] <= cutoff:
            times.popleft()
        outputs[output_sig] = (times, prompt_len)
        if len(outputs) > self._output_cap:
            del outputs[next(iter(outputs))]
        run = len(times)
        if run >= self._max_output:
            st.trip_until = now + self._window
            st.trip_count = run
            self._recorded += 1

    def stats(self) -> dict[str, int]:
        """Keys tracked, verdicts returned per rule, repeat_output trips recorded."""
        return {"keys": len(self._keys), REPEAT_PROMPT: self._prompt_trips,
                REPEAT_OUTPUT: self._output_trips, "repeat_output_recorded": self._recorded}

    def _state(self, key: str) -> _KeyState:
        keys = self._keys
        st = keys.get(key)
        if st is None:
            if len(keys) >= self.config.max_keys:
                keys.popitem(last=False)
            st = keys[key] = _KeyState()
        else:
            keys.move_to_end(key)
        return st

    def check_integrity(self) -> None:
        """Raise AssertionError if a key's counts disagree with its history or a bound is hit."""
        assert len(self._keys) <= self.config.max_keys
        for key, st in self._keys.items():
            assert len(st.prompts) <= self._prompt_cap, key
            assert len(st.outputs) <= self._output_cap, key
            want: dict[int, int] = {}
            for _, sig in st.prompts:
                want[sig] = want.get(sig, 0) + 1
            assert st.counts == want, f"{key}: prompt counts disagree with the history"
            times = [t for t, _ in st.prompts]
            assert times == sorted(times), f"{key}: prompt history out of order"
            for run, _ in st.outputs.values():
                assert list(run) == sorted(run), f"{key}: output history out of order"
