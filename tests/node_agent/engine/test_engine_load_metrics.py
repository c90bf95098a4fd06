"""The engine's load signals for the router: queued prefill tokens, request timings, /metrics."""

from __future__ import annotations

import itertools

from meshd.coordinator.gateway.workers.load import parse
from meshd.kv_transfer.leases import LeaseStats
from meshd.node_agent.engine.async_engine import DriverStats
from meshd.node_agent.engine.disagg import DisaggStats
from meshd.node_agent.engine.metrics import ServerSnapshot, render
from tests.node_agent.engine.engine_helpers import make_engine, make_prompt, make_request, run_all


def test_queued_prefill_tokens_count_waiting_and_the_rest_of_prefilling() -> None:
    # budget 16 tokens a step: a 40-token prompt prefills in chunks 16, 16, 8
    e = make_engine(max_num_batched_tokens=16, enable_prefix_caching=False)
    e.add_request(make_request("a", make_prompt(40), max_tokens=3))
    e.add_request(make_request("b", make_prompt(10, offset=1), max_tokens=3))
    assert e.stats().num_waiting_tokens == 50
    e.step()  # a: 16 computed
    assert e.stats().num_waiting_tokens == 24 + 10
    e.step()  # a: 32 computed
    assert e.stats().num_waiting_tokens == 8 + 10
    e.step()  # a: done (first token), b: 8 of 10
    assert e.stats().num_waiting_tokens == 2
    e.step()  # b: first token; a decodes: its single pending token is not prefill
    assert e.stats().num_waiting_tokens == 0
    run_all(e)
    assert e.stats().num_waiting_tokens == 0


def test_request_timings_histograms_on_a_fake_clock() -> None:
    ticks = itertools.count()
    e = make_engine()
    e.timings.clock = lambda: float(next(ticks))
    e.add_request(make_request("a", make_prompt(12), max_tokens=4))
    run_all(e)
    hist = dict(e.stats().histograms)
    prefill, prompt, itl = (hist[f"vllm:{n}"] for n in (
        "request_prefill_time_seconds", "request_prompt_tokens", "inter_token_latency_seconds"))
    # each step reads the clock twice (scheduled, stepped): prefill 1 tick, each gap 2 ticks
    assert (prefill.observations, prefill.sum) == (1, 1.0)
    assert (prompt.observations, prompt.sum) == (1, 12.0)
    assert (itl.observations, itl.sum) == (3, 6.0)
    assert e.timings._scheduled == {} and e.timings._last == {}  # forgotten at finish


def test_metrics_text_carries_the_queue_gauge_and_histograms_in_vllm_names() -> None:
    e = make_engine(max_num_batched_tokens=16)
    e.add_request(make_request("a", make_prompt(30), max_tokens=2))
    e.step()
    d = DriverStats(e.stats(), e.blocks.num_free_blocks, e.config.num_blocks, 1, 0, 0.0)
    text = render("m", d, DisaggStats(), ServerSnapshot(0, LeaseStats(), {}, 0, 0))
    load = parse(text)
    assert load.num_waiting_tokens == 14 and load.num_running == 1
    run_all(e)
    d = DriverStats(e.stats(), e.blocks.num_free_blocks, e.config.num_blocks, 1, 0, 0.0)
    load = parse(render("m", d, DisaggStats(), ServerSnapshot(0, LeaseStats(), {}, 0, 0)))
    assert load.num_waiting_tokens == 0
    assert (load.prefill_count, load.request_prompt_tokens_sum, load.itl_count) == (1, 30, 1)
    assert load.prefill_s_sum > 0 and load.itl_s_sum > 0
