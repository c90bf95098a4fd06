"""W3C trace context at the gateway: the client's `traceparent` in, one per worker call out.

    ctx = tracer.begin(header)          # per request: the client's trace, or a new one
    tp = ctx.child()                    # per worker call: (span id, its `traceparent` value)

A valid `traceparent` (`00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, version 00 as
the spec defines; an unknown higher version is read by the same fields) continues the client's
trace: the gateway's request span is a child of the client's span, and each worker call's
span a child of it, so a worker that traces (vLLM with `--otlp-traces-endpoint`) joins the same
trace. An invalid or absent header starts a new trace (the spec's rule: never fail a request
on it). Whether a request is recorded (`sampled`) follows the sampler: `always_on`,
`always_off`, `ratio` (of trace ids, so every service of one trace agrees), or `parentbased_*`:
the client's sampled flag when it sent one, else the named rule. Ids come from
`random.getrandbits` (not a CSPRNG: trace ids are identifiers, not secrets, as in the OTel SDK).
"""

from __future__ import annotations

import random
import re
from typing import NamedTuple

SAMPLERS = ("always_on", "always_off", "ratio", "parentbased_always_on",
            "parentbased_always_off", "parentbased_ratio")
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_TRACE_ID_LIMIT = 1 << 64  # ratio sampling reads the trace id's low 64 bits, as OTel's does


class Parent(NamedTuple):
    """The client's span, from its `traceparent`."""

    trace_id: int
    span_id: int
    sampled: bool


def parse_traceparent(value: str | bytes | None) -> Parent | None:
    """The client's span, or None for an absent or invalid header (a new trace starts)."""
    if not value:
        return None
    v = (value.encode("latin-1") if isinstance(value, str) else value).strip().lower()
    m = _TRACEPARENT.fullmatch(v, 0, 55)
    if m is None:
        return None
    version, trace, span, flags = m.groups()
    if version == b"ff" or (len(v) != 55 and (version == b"00" or v[55] != 45)):  # 45: "-"
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if not trace_id or not span_id:
        return None
    return Parent(trace_id, span_id, bool(int(flags, 16) & 1))


def traceparent(trace_id: int, span_id: int, sampled: bool) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def new_span_id() -> int:
    return random.getrandbits(64) or 1


class TraceContext(NamedTuple):
    """One request's place in its trace: `span_id` is the gateway's request span (a tuple:
    made per request, it must be cheap)."""

    trace_id: int
    span_id: int
    parent_span_id: int  # the client's span; 0: the request span is the trace's root
    sampled: bool

    @property
    def trace_hex(self) -> str:
        return f"{self.trace_id:032x}"

    def child(self) -> tuple[int, str]:
        """A worker call's span id and the `traceparent` the worker gets (its parent: the
        call's span)."""
        span = random.getrandbits(64) or 1
        return span, f"00-{self.trace_id:032x}-{span:016x}-{'01' if self.sampled else '00'}"


class Sampler:
    def __init__(self, rule: str = "parentbased_always_on", ratio: float = 1.0) -> None:
        if rule not in SAMPLERS:
            raise ValueError(f"gateway.tracing.sampler: must be one of {', '.join(SAMPLERS)}, "
                             f"got {rule!r}")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"gateway.tracing.ratio: must be in [0, 1], got {ratio!r}")
        self.parent_based = rule.startswith("parentbased_")
        base = rule.removeprefix("parentbased_")
        self._bound = (_TRACE_ID_LIMIT if base == "always_on" else 0 if base == "always_off"
                       else int(ratio * _TRACE_ID_LIMIT))

    def begin(self, header: str | bytes | None) -> TraceContext:
        """The request's trace context: the client's trace continued, or a new one."""
        parent = parse_traceparent(header)
        span = new_span_id()
        if parent is None:
            trace = random.getrandbits(128) or 1
            return TraceContext(trace, span, 0, self._sampled(trace))
        sampled = parent.sampled if self.parent_based else self._sampled(parent.trace_id)
        return TraceContext(parent.trace_id, span, parent.span_id, sampled)

    def _sampled(self, trace_id: int) -> bool:
        return (trace_id & (_TRACE_ID_LIMIT - 1)) < self._bound
