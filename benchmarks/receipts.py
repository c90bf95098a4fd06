"""Receipt costs (issue 12 §2), in process: what the gateway spends building and signing a
response's receipt (`ReceiptSigner.build`: digests of the prompt ids, each segment's output ids
and the text, canonical JSON, one Ed25519 signature), what a decode worker spends attesting its
output (`receipts.attest`), and what a client spends verifying one offline (`receipts.verify`).

    .venv/bin/python benchmarks/receipts.py [--rounds 5] [--n 2000]

Per response shape (prompt tokens, output tokens, segments): median over rounds of the mean
CPU µs per call (thread CPU clock). Writes benchmarks/results/receipts.json. In place, the
gateway's figure is `benchmarks/gateway.py`'s `meshd-mesh-receipts-2`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from nacl.signing import SigningKey

from meshd import receipts
from meshd.coordinator.gateway.serving.receipts import ReceiptSigner, Segment
from meshd.coordinator.gateway.serving.shapes import ChoiceOutput

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(128, 16, 1), (1024, 128, 1), (1024, 128, 2), (4096, 1024, 1)]
NODE = SigningKey(bytes([1]) * 32)
GATEWAY = SigningKey(bytes([2]) * 32)


def cpu_us(fn: Any, n: int) -> float:
    t0 = time.thread_time_ns()
    for _ in range(n):
        fn()
    return (time.thread_time_ns() - t0) / n / 1000


def shape(prompt_n: int, out_n: int, segs: int) -> tuple[Any, ...]:
    prompt = list(range(1000, 1000 + prompt_n))
    ids = [(7 * i) % 50_000 for i in range(out_n)]
    text = "".join(f"w{i} " for i in ids)
    cut = [out_n * k // segs for k in range(segs)] + [out_n]
    segments = []
    for k in range(segs):
        att = receipts.attest(NODE, model="m", request_id="r-d", choice=0,
                              prompt_ids=prompt + ids[:cut[k]], output_ids=ids[cut[k]:cut[k + 1]],
                              finish_reason="length")
        segments.append(Segment(f"w{k}", att["node_id"], cut[k], att))
    run = SimpleNamespace(segments=segments, prefilled_on=("p0", att["node_id"]))
    out = ChoiceOutput(text=[text], token_ids=ids, finish_reason="length")
    return prompt, ids, text, run, out


def measure(signer: ReceiptSigner, keys: receipts.KeySet, prompt_n: int, out_n: int,
            segs: int, rounds: int, n: int) -> dict[str, Any]:
    prompt, ids, text, run, out = shape(prompt_n, out_n, segs)

    def build() -> Any:
        return signer.build(request_id="r1", response_id="cmpl-r1", model="m", tenant="t",
                            created_ms=0, prompt_ids=prompt, runs=[run], outputs=[out])

    def attest() -> Any:
        return receipts.attest(NODE, model="m", request_id="r-d", choice=0, prompt_ids=prompt,
                               output_ids=ids, finish_reason="length")

    signed = build()
    assert receipts.verify(signed, keys, {0: text}).ok

    def check() -> Any:
        return receipts.verify(signed, keys, {0: text})

    def sign_only() -> Any:
        return GATEWAY.sign(b"x" * 600)

    med = {name: statistics.median(cpu_us(fn, n) for _ in range(rounds))
           for name, fn in (("gateway_build_us", build), ("worker_attest_us", attest),
                            ("client_verify_us", check), ("ed25519_sign_us", sign_only))}
    return {"prompt_tokens": prompt_n, "output_tokens": out_n, "segments": segs,
            "receipt_bytes": len(receipts.canonical(signed)), **med}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=2000)
    a = ap.parse_args()
    signer = ReceiptSigner(GATEWAY)
    keys = receipts.KeySet.from_json({
        "gateways": [signer.published()],
        "nodes": [{"node_id": receipts.node_id_for(bytes(NODE.verify_key)),
                   "public_key": bytes(NODE.verify_key).hex()}]})
    rows = [measure(signer, keys, *sh, a.rounds, a.n) for sh in SHAPES]
    hdr = (f"{'prompt':>7}{'output':>7}{'segs':>5}{'bytes':>7}{'gateway build':>15}"
           f"{'of it: sign':>12}{'worker attest':>15}{'client verify':>15}")
    print("CPU µs per call (median of rounds)")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['prompt_tokens']:>7}{r['output_tokens']:>7}{r['segments']:>5}"
              f"{r['receipt_bytes']:>7}{r['gateway_build_us']:>15.1f}"
              f"{r['ed25519_sign_us']:>12.1f}{r['worker_attest_us']:>15.1f}"
              f"{r['client_verify_us']:>15.1f}")
    out = ROOT / "benchmarks" / "results" / "receipts.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rounds": a.rounds, "n": a.n, "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
