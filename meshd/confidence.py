"""A generated token's confidence from its logprobs: what the gateway's meter and the vLLM
scorer (`meshd.node_agent.vllm_scorer`) both compute. Standard library only: it runs inside
vLLM's API server too, where meshd is installed without its dependencies.

The token's entropy is estimated over the alternatives plus one bucket for the probability
mass they leave out, and its confidence is exp(-entropy):

    H = -sum(p_i ln p_i) - r ln r,   r = max(0, 1 - sum(p_i))      (nats)
    confidence = exp(-H)                                           (1: certain; 1/k: k-way tie)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

__all__ = ["token_confidence"]


def token_confidence(sampled: float | None, top: Mapping[str, float] | None,
                     token: str | None = None) -> float | None:
    """exp(-entropy) of one position (None without any logprob). `token`: the sampled
    token's name, counted once whether or not the alternatives list it."""
    if not top:
        return None if sampled is None else _confidence((sampled,))
    if sampled is not None and (token is None or token not in top):
        return _confidence((*top.values(), sampled))  # sampled outside the alternatives
    return _confidence(top.values())


def _confidence(logprobs: Iterable[float]) -> float:
    """p ln p is p * logprob: one exp per alternative, one log for the rest of the mass.
    A value that is not a number below or at 0 (NaN, a bogus positive) is skipped."""
    h = mass = 0.0
    for lp in logprobs:
        if lp < 0.0:
            p = math.exp(lp)
            mass += p
            h -= p * lp
        elif lp == 0.0:
            mass += 1.0
    rest = 1.0 - mass
    if rest > 1e-12:
        h -= rest * math.log(rest)
    return math.exp(-h)
