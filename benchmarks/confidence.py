"""The gateway CPU confidence scoring adds: `ConfidenceMeter.observe` + the halt check per
token, for worker deltas carrying k top alternatives (completions-form logprobs, one token per
delta as workers stream them).

    .venv/bin/python benchmarks/confidence.py [--tokens 200000]

Reported: the best of 5 runs, microseconds per token and per 16- and 256-token choice, for
k = 1, 5, 20. Writes benchmarks/results/confidence.json. With scoring off nothing runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from meshd.coordinator.gateway.serving.confidence import ConfidenceMeter

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
    out = ROOT / "benchmarks" / "results" / "confidence.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
