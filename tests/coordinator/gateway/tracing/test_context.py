"""W3C trace context parsing and sampling (issue 13 §2), table-driven, and the trace context a
choice run passes to each worker call."""

from __future__ import annotations

import pytest

from meshd.coordinator.gateway.tracing.context import (
    Sampler,
    TraceContext,
    parse_traceparent,
    traceparent,
)

TRACE, SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.mark.parametrize(("header", "want"), [
    (f"00-{TRACE}-{SPAN}-01", (int(TRACE, 16), int(SPAN, 16), True)),
    (f"00-{TRACE}-{SPAN}-00", (int(TRACE, 16), int(SPAN, 16), False)),
    (f"  00-{TRACE.upper()}-{SPAN}-01 ", (int(TRACE, 16), int(SPAN, 16), True)),
    (f"01-{TRACE}-{SPAN}-09-future-field", (int(TRACE, 16), int(SPAN, 16), True)),
    (f"00-{TRACE}-{SPAN}-01-extra", None),  # version 00 has exactly four fields
    (f"01-{TRACE}-{SPAN}-01x", None),
    (f"ff-{TRACE}-{SPAN}-01", None),  # version ff is invalid
    (f"00-{'0' * 32}-{SPAN}-01", None),  # all-zero ids are invalid
    (f"00-{TRACE}-{'0' * 16}-01", None),
    (f"00-{TRACE[:-1]}-{SPAN}-01", None),
    ("garbage", None), ("", None), (None, None),
])
def test_traceparent_parsing(header: str | None, want: tuple[int, int, bool] | None) -> None:
    got = parse_traceparent(header)
    assert (None if got is None else (got.trace_id, got.span_id, got.sampled)) == want
    if isinstance(header, str):
        again = parse_traceparent(header.encode())
        assert again == got


def test_format_round_trips() -> None:
    value = traceparent(int(TRACE, 16), int(SPAN, 16), True)
    assert value == f"00-{TRACE}-{SPAN}-01"
    parent = parse_traceparent(value)
    assert parent is not None and parent.sampled


def test_a_request_continues_the_clients_trace_and_each_call_gets_a_span() -> None:
    ctx = Sampler().begin(f"00-{TRACE}-{SPAN}-01")
    assert ctx.trace_hex == TRACE and ctx.parent_span_id == int(SPAN, 16) and ctx.sampled
    spans = set()
    for _ in range(50):
        span, tp = ctx.child()
        parsed = parse_traceparent(tp)
        assert parsed is not None and parsed.trace_id == ctx.trace_id
        assert parsed.span_id == span and parsed.sampled
        spans.add(span)
    assert len(spans) == 50 and ctx.span_id not in spans
    fresh = Sampler().begin(None)
    assert fresh.parent_span_id == 0 and fresh.trace_id != ctx.trace_id and fresh.sampled


@pytest.mark.parametrize(("rule", "ratio", "parent", "want"), [
    ("parentbased_always_on", 1.0, "01", True),
    ("parentbased_always_on", 1.0, "00", False),  # the client said: not sampled
    ("parentbased_always_on", 1.0, None, True),
    ("parentbased_always_off", 1.0, "01", True),
    ("parentbased_always_off", 1.0, None, False),
    ("always_on", 1.0, "00", True),
    ("always_off", 1.0, "01", False),
    ("ratio", 0.0, "01", False),
    ("ratio", 1.0, "00", True),
])
def test_samplers(rule: str, ratio: float, parent: str | None, want: bool) -> None:
    header = None if parent is None else f"00-{TRACE}-{SPAN}-{parent}"
    assert Sampler(rule, ratio).begin(header).sampled is want


def test_ratio_sampling_keeps_about_the_ratio_and_agrees_per_trace() -> None:
    s = Sampler("ratio", 0.25)
    kept = sum(s.begin(None).sampled for _ in range(4000))
    assert 800 < kept < 1200
    header = f"00-{TRACE}-{SPAN}-01"
    assert len({Sampler("ratio", 0.25).begin(header).sampled for _ in range(20)}) == 1


def test_bad_sampler_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"gateway\.tracing\.sampler"):
        Sampler("sometimes")
    with pytest.raises(ValueError, match=r"gateway\.tracing\.ratio"):
        Sampler("ratio", 1.5)


def test_context_is_plain_data() -> None:
    ctx = TraceContext(1, 2, 0, True)
    assert ctx.trace_hex == "0" * 31 + "1"
