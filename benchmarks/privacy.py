"""The privacy stage's CPU cost per request, in process: the guard's `check` (header, tenant
policy, detector, eligibility) on prompts of several sizes and contents, with detection on
and off.

    .venv/bin/python benchmarks/privacy.py [--repeat 2000]

Prompts: a short chat turn, 1 KB and 8 KB of prose, 1 KB of prose dense with numbers (dates,
prices, versions: the number-shaped detectors' worst case among clean text), 1 KB with an
email, a card number and a phone number (validators run). Reported: the best of 5 runs of
`--repeat` checks, microseconds per check; the verdict. Writes benchmarks/results/privacy.json.
The same stage is timed in place on live replicas by `benchmarks/gateway.py`
(`meshd-mesh-privacy-2`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from meshd.capabilities import Member, Worker
from meshd.coordinator.gateway.config import Limits
from meshd.coordinator.gateway.http.api_request import ApiRequest, Endpoint
from meshd.coordinator.gateway.http.openai_api import parse_chat
from meshd.coordinator.gateway.privacy.config import PrivacyConfig
from meshd.coordinator.gateway.privacy.guard import PrivacyGuard

ROOT = Path(__file__).resolve().parent.parent
PROSE = ("The quick brown fox jumps over the lazy dog while the band plays on. " * 20)[:1024]
NUMBERS = ("In 2024 there were 1,234 items costing $56.78 each, version 1.2.3, at 3:45. "
           * 14)[:1024]
PII = PROSE[:900] + " jane.doe@example.com 4111 1111 1111 1111 +1 415-555-2671"
PROMPTS = {"short turn": "Say hello.", "prose 1 KB": PROSE, "numbers 1 KB": NUMBERS,
           "prose 8 KB": PROSE * 8, "pii 1 KB": PII}


def request(text: str) -> ApiRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": text}]}
    return ApiRequest(Endpoint.CHAT, "r", parse_chat(body, Limits()), body, json.dumps(
        body).encode(), "bench", 0.0)


def per_check_us(guard: PrivacyGuard, req: ApiRequest, repeat: int) -> float:
    attrs = [Member("n", Worker("w", "http://127.0.0.1:1", "both", "m"),
                    {"privacy": "restricted"}).attributes]

    def serving(_model: str) -> list[Any]:
        return attrs

    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(repeat):
            guard.check(req, serving)
        best = min(best, (time.perf_counter() - t0) / repeat)
    return best * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=2000)
    a = ap.parse_args()
    on, off = PrivacyGuard(PrivacyConfig(enabled=True)), PrivacyGuard(PrivacyConfig())
    rows = []
    print(f"{'prompt':<14}{'bytes':>7}{'off us':>9}{'on us':>9}  verdict")
    for name, text in PROMPTS.items():
        req = request(text)
        _, classes = on.check(req, lambda _m: [{"privacy": "restricted"}])
        kinds = on.detector.scan([text]).kinds()
        row = {"prompt": name, "bytes": len(text.encode()),
               "off_us": per_check_us(off, req, a.repeat),
               "on_us": per_check_us(on, req, a.repeat),
               "sensitive": classes is not None, "findings": kinds}
        rows.append(row)
        verdict = ", ".join(f"{k} x{n}" for k, n in kinds.items()) or "clean"
        print(f"{name:<14}{row['bytes']:>7}{row['off_us']:>9.1f}{row['on_us']:>9.1f}  {verdict}")
    out = ROOT / "benchmarks" / "results" / "privacy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "repeat": a.repeat,
                               "python": sys.version.split()[0], "rows": rows}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
