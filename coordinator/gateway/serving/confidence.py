"""Confidence of a choice's tokens, from the workers' logprobs, and the streaming halt.

Per generated token the worker reports the sampled token's logprob and its `top_logprobs`
alternatives (completions form) — or, a worker that scores its own tokens (meshd's engine:
`meshd_confidence`, exp(-entropy) over its whole vocabulary, exact), one float per token,
which `ConfidenceMeter.extend` adds as they are. From logprobs, the token's entropy is
estimated over the alternatives plus one bucket for the probability mass they leave out:

    H = -sum(p_i ln p_i) - r ln r,   r = max(0, 1 - sum(p_i))      (nats)
    confidence = exp(-H)                                           (1: certain; 1/k: k-way tie)

`ConfidenceMeter` keeps the mean and minimum over the choice and a rolling mean over the last
`window` tokens; with `halt_below` > 0 the choice is halted once that rolling mean (over a full
window) drops below it. The gateway asks the workers for `top_logprobs` alternatives whatever
the client asked (`[gateway.confidence] top_logprobs`), and strips them again when the client
did not ask for logprobs, so the client's own answer is unchanged. Pure: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshd.coordinator.gateway.governance.metrics import CpuSample

HALTED = "low_confidence"  # the finish_reason of a halted choice
_NONE: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class ConfidenceConfig:
    """`[gateway.confidence]`. `halt_below` 0: never halt (a tenant's `confidence_halt_below`
    or a request's `x-meshd-halt-below` header may set one)."""

    enabled: bool = False
    top_logprobs: int = 5  # alternatives asked of the workers per token
    window: int = 16  # tokens in the rolling mean the halt judges
    halt_below: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.top_logprobs <= 20:
            raise ValueError("gateway.confidence.top_logprobs: must be in 1..20")
        if not 1 <= self.window <= 4096:
            raise ValueError("gateway.confidence.window: must be in 1..4096")
        check_threshold(self.halt_below, "gateway.confidence.halt_below")


def check_threshold(value: float, where: str) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{where}: must be in [0, 1), got {value!r}")


class ConfidenceCost:
    """What scoring costs one replica, timed in place: `cpu` samples `observe` calls (one
    worker delta each), `choices` and `deltas` count what was scored, so a choice's cost is
    the mean sample times its mean number of deltas. GET /debug/governance `confidence`."""

    __slots__ = ("choices", "cpu", "deltas")

    def __init__(self) -> None:
        self.cpu = CpuSample()
        self.choices = self.deltas = 0

    def describe(self) -> dict[str, Any]:
        per_delta = self.cpu.net_mean_us()
        per_choice = (None if per_delta is None or not self.choices
                      else round(per_delta * self.deltas / self.choices, 2))
        return {"choices": self.choices, "deltas": self.deltas,
                "cost_us": {"observe": per_delta, "choice": per_choice,
                            "deltas_per_choice": round(self.deltas / max(1, self.choices), 2),
                            "samples": self.cpu.samples, "every": self.cpu.EVERY}}


class ConfidenceMeter:
    """Mean, minimum and rolling mean of one choice's token confidences. `observe` scores a
    whole delta in one pass (the per-token work of `token_confidence`, inlined: no call, no
    allocation per token); the rolling window is a ring of `window` floats. `cost`: where it
    times itself (shared by the replica's meters)."""

    __slots__ = ("_cost", "_n", "_pos", "_ring", "_window_sum", "count", "halt_below", "min",
                 "sum", "window")

    def __init__(self, window: int, halt_below: float = 0.0,
                 cost: ConfidenceCost | None = None) -> None:
        self._cost = cost
        if cost is not None:
            cost.choices += 1
        self.window, self.halt_below = window, halt_below
        self.count, self.sum, self.min = 0, 0.0, 1.0
        self._ring = [0.0] * window
        self._pos = self._n = 0  # next ring slot; values in the ring (<= window)
        self._window_sum = 0.0

    def observe(self, lp: Mapping[str, Any]) -> None:
        """One completions-form logprobs object: `token_logprobs` and `top_logprobs` lists
        (and `tokens`, to count a sampled token the alternatives list only once). A malformed
        entry (a worker's bug) is not scored."""
        sampled = lp.get("token_logprobs")
        if not sampled:
            return
        cost = self._cost
        t0 = 0
        if cost is not None:
            cost.deltas += 1
            t0 = cost.cpu.start()
        tops = lp.get("top_logprobs") or _NONE
        tokens = lp.get("tokens") or _NONE
        n_tops, n_tokens = len(tops), len(tokens)
        exp, log = math.exp, math.log
        ring, window = self._ring, self.window
        pos, n, wsum, total, low, count = (self._pos, self._n, self._window_sum, self.sum,
                                           self.min, self.count)
        for i, s in enumerate(sampled):
            top = tops[i] if i < n_tops else None
            try:
                h = mass = 0.0
                if top.__class__ is dict and top:
                    for lp_i in top.values():
                        if lp_i < 0.0:
                            p = exp(lp_i)
                            mass += p
                            h -= p * lp_i
                        elif lp_i == 0.0:
                            mass += 1.0
                    extra = s is not None and (i >= n_tokens or tokens[i] not in top)
                elif s is None:
                    continue
                else:
                    extra = True
                if extra:  # the sampled token, outside the alternatives (or without any)
                    if s < 0.0:
                        p = exp(s)
                        mass += p
                        h -= p * s
                    elif s == 0.0:
                        mass += 1.0
            except TypeError:
                continue
            rest = 1.0 - mass
            if rest > 1e-12:
                h -= rest * log(rest)
            c = exp(-h)
            count += 1
            total += c
            if c < low:
                low = c
            if n == window:
                wsum -= ring[pos]
            else:
                n += 1
            ring[pos] = c
            wsum += c
            pos = pos + 1 if pos + 1 < window else 0
        self._pos, self._n, self._window_sum, self.sum, self.min, self.count = (
            pos, n, wsum, total, low, count)
        if t0:
            cost.cpu.stop(t0)  # type: ignore[union-attr]  # t0 is set only with a cost

    def extend(self, scores: Any) -> None:
        """The worker's own scores (`meshd_confidence`: exp(-entropy) over its whole
        vocabulary, one per token): added as they are. A value that is not a number in [0, 1]
        (a worker's bug) is not scored."""
        if type(scores) is not list or not scores:
            return
        cost = self._cost
        t0 = 0
        if cost is not None:
            cost.deltas += 1
            t0 = cost.cpu.start()
        ring, window = self._ring, self.window
        pos, n, wsum, total, low, count = (self._pos, self._n, self._window_sum, self.sum,
                                           self.min, self.count)
        for c in scores:
            if not (c.__class__ is float and 0.0 <= c <= 1.0):
                continue
            count += 1
            total += c
            if c < low:
                low = c
            if n == window:
                wsum -= ring[pos]
            else:
                n += 1
            ring[pos] = c
            wsum += c
            pos = pos + 1 if pos + 1 < window else 0
        self._pos, self._n, self._window_sum, self.sum, self.min, self.count = (
            pos, n, wsum, total, low, count)
        if t0:
            cost.cpu.stop(t0)  # type: ignore[union-attr]  # t0 is set only with a cost

    def add(self, c: float) -> None:
        """One token's confidence (as scored by `token_confidence`)."""
        self.count += 1
        self.sum += c
        self.min = min(self.min, c)
        if self._n == self.window:
            self._window_sum -= self._ring[self._pos]
        else:
            self._n += 1
        self._ring[self._pos] = c
        self._window_sum += c
        self._pos = (self._pos + 1) % self.window

    @property
    def rolling(self) -> float | None:
        return self._window_sum / self._n if self._n else None

    def halted(self) -> bool:
        return (self.halt_below > 0 and self._n == self.window
                and self._window_sum / self.window < self.halt_below)

    def why(self) -> str:
        return (f"the mean confidence of the last {self.window} tokens, {self.rolling:.3f}, "
                f"fell below {self.halt_below:g}")


def summary(meters: list[ConfidenceMeter]) -> dict[str, Any] | None:
    """The usage extension over a request's choices (None when nothing was measured)."""
    n = sum(m.count for m in meters)
    if not n:
        return None
    return {"confidence_mean": round(sum(m.sum for m in meters) / n, 6),
            "confidence_min": round(min(m.min for m in meters if m.count), 6),
            "tokens_scored": n,
            "halted": sum(1 for m in meters if m.halted())}
