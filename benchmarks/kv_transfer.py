"""KV transfer throughput: TCP and shm between two processes, against torch memcpy bandwidth.

    python benchmarks/kv_transfer.py [--mb 128] [--repeats 3]

Moves a realistic block set (Llama-8B-like layout: 32 layers, 8 KV heads, head_dim 128, bf16,
block 16 = 2 MiB per block) from a server process to this process, and prints GB/s (1e9 bytes/s)
next to a same-size `torch` copy measured in the same run. Writes
benchmarks/results/kv_transfer.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path

import torch

from meshd.kv_transfer.layout import BlockLayout
from meshd.kv_transfer.testing import make_kv, run_server_process
from meshd.kv_transfer.transport import Peer, make_client

LAYOUT = BlockLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_size=16)
SECRET = b"benchmark-secret-0123456789abcdef"


def memcpy_gbps(nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm up, fault pages in
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return nbytes / best / 1e9


def _timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def transfer_gbps(name: str, num_blocks: int, repeats: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    held = {f"r{i}": list(range(num_blocks)) for i in range(repeats + 1)}
    ready, events, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=run_server_process, args=(
        name, LAYOUT.to_dict(), num_blocks, 1, ("hmac", SECRET, []), held, ready, events, stop),
        daemon=True)
    proc.start()
    try:
        peer = Peer("127.0.0.1", ready.get(timeout=120))
        dst = make_kv(LAYOUT, num_blocks, None)
        from meshd.kv_transfer.auth import SharedSecretAuthenticator

        client = make_client(name, dst, LAYOUT, SharedSecretAuthenticator(SECRET))
        ids = list(range(num_blocks))
        times = []
        for i in range(repeats + 1):  # the first run warms up (page faults, connections)
            result = client.fetch(peer, f"r{i}", ids, ids, timeout_s=120)
            if not result.ok:
                raise RuntimeError(f"{name}: {result.error}")
            times.append(result.seconds)
        best = min(times[1:])
        return {"gbps": result.bytes / best / 1e9, "seconds": best, "bytes": result.bytes}
    finally:
        stop.set()
        proc.join(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=128, help="payload size in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    num_blocks = max(1, (args.mb << 20) // LAYOUT.bytes_per_block)
    nbytes = num_blocks * LAYOUT.bytes_per_block
    rows = {"memcpy (torch copy_)": {"gbps": memcpy_gbps(nbytes, args.repeats)}}
    for name in ("tcp", "shm"):
        rows[name] = transfer_gbps(name, num_blocks, args.repeats)
    base = rows["memcpy (torch copy_)"]["gbps"]
    print(f"payload {nbytes / 2**20:.0f} MiB = {num_blocks} blocks of {LAYOUT}")
    print(f"{'path':<22}{'GB/s':>8}{'vs memcpy':>11}")
    for name, row in rows.items():
        print(f"{name:<22}{row['gbps']:>8.2f}{row['gbps'] / base:>10.0%}")
    out = Path(__file__).parent / "results" / "kv_transfer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "layout": LAYOUT.to_dict(), "payload_bytes": nbytes, "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "results": rows,
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
