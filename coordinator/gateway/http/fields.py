"""Readers for one field of a decoded OpenAI body: type and range checks, nothing else.

Each takes the body dict and a key, returns the value (None / False / () when absent or null)
or raises `ApiError(400)` whose `param` is the key and whose message states the accepted range.
Booleans are never integers here (`true` is not `1`), and floats are never integers (`5.0` is
not `5`; orjson hands over integers beyond 64 bits as floats, so those fail the type check).
"""

from __future__ import annotations

import math
from typing import Any

from meshd.api_errors import invalid

TOKEN_ID_MAX = 2**31 - 1


def opt_int(obj: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    v = obj.get(key)
    if v is None:
        return None
    if type(v) is not int:
        raise invalid(f"'{key}' must be an integer between {lo} and {hi}, got {v!r}.", key)
    if not lo <= v <= hi:
        raise invalid(f"'{key}' must be between {lo} and {hi}, got {v}.", key)
    return v


def opt_float(obj: dict[str, Any], key: str, lo: float, hi: float,
              lo_open: bool = False) -> float | None:
    """A number in [lo, hi] (or (lo, hi] with `lo_open`); `hi` may be math.inf (the JSON
    decoder never yields an infinite or NaN value)."""
    v = obj.get(key)
    if v is None:
        return None
    if type(v) is not float and type(v) is not int:
        raise invalid(f"'{key}' must be a number, got {type(v).__name__}.", key)
    if v > hi or v < lo or (lo_open and v == lo):
        lo_s = f"({lo}" if lo_open else f"[{lo}"
        hi_s = "inf)" if math.isinf(hi) else f"{hi}]"
        raise invalid(f"'{key}' must be in {lo_s}, {hi_s}, got {v}.", key)
    return float(v)


def opt_bool(obj: dict[str, Any], key: str) -> bool:
    v = obj.get(key)
    if v is None:
        return False
    if type(v) is not bool:
        raise invalid(f"'{key}' must be a boolean.", key)
    return v


def opt_str(obj: dict[str, Any], key: str) -> str | None:
    v = obj.get(key)
    if v is None or type(v) is str:
        return v
    raise invalid(f"'{key}' must be a string.", key)


def stop(obj: dict[str, Any], limit: int) -> tuple[str, ...]:
    """`stop`: a non-empty string or a list of at most `limit` of them (vLLM and the engine
    refuse an empty stop string)."""
    v = obj.get("stop")
    if v is None:
        return ()
    seq = [v] if type(v) is str else v
    if type(seq) is not list or any(type(s) is not str for s in seq):
        raise invalid("'stop' must be a string or a list of strings.", "stop")
    if len(seq) > limit:
        raise invalid(f"'stop' may hold at most {limit} sequences.", "stop")
    if not all(seq):
        raise invalid("'stop' must not contain an empty string.", "stop")
    return tuple(seq)


def token_ids(obj: dict[str, Any], key: str) -> tuple[int, ...] | None:
    """A list of token ids (integers in [0, 2^31))."""
    v = obj.get(key)
    if v is None:
        return None
    if type(v) is not list or not all(type(t) is int and 0 <= t <= TOKEN_ID_MAX for t in v):
        raise invalid(f"'{key}' must be a list of token ids (integers in [0, 2^31)).", key)
    return tuple(v)


def logit_bias(obj: dict[str, Any]) -> None:
    """`logit_bias`: an object of token id (as a string) -> number (vLLM clamps to ±100)."""
    v = obj.get("logit_bias")
    if v is None:
        return
    ok = type(v) is dict and all(
        k.isascii() and k.isdigit() and int(k) <= TOKEN_ID_MAX
        and (type(b) is float or type(b) is int) for k, b in v.items())
    if not ok:
        raise invalid("'logit_bias' must map token ids (strings of digits) to numbers.",
                      "logit_bias")
