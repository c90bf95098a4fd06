"""Sampling seeds as both OpenAI front ends (the gateway and the embedded engine) read them.

Workers take int64 seeds (vLLM: `torch.long`) and read -1 as "no seed". A request with `n > 1`
samples each choice with its own seed, derived the same way on both front ends, so `n` through
the gateway samples what `n` on one engine does.
"""

from __future__ import annotations

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
UNSEEDED = -1
_SPAN = SEED_MAX - SEED_MIN + 1


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice `index`: `seed + index` wrapped into int64, stepping over -1. Choice 0
    keeps `seed`; different indexes give different seeds."""
    if index == 0:
        return seed
    off, skip = seed - SEED_MIN, UNSEEDED - SEED_MIN
    pos = off + index
    if off < skip <= pos or off < skip + _SPAN <= pos:
        pos += 1
    return pos % _SPAN + SEED_MIN
