#!/usr/bin/env python3
"""GPU KV transfer throughput: CUDA IPC, NCCL and TCP staged through host memory, against a
device-to-device gather/scatter copy.

    python benchmarks/kv_transfer_gpu.py [--blocks 256] [--repeat 10] [--out results/kv_gpu.json]

Each transport pulls `--blocks` blocks of a Llama-8B-like layout (32 layers, 8 KV heads,
head_dim 128, bf16, block 16: 2 MiB per block over all layers) from a server
process (`tests/gpu/kv_server.py`) into this process; the baseline is the same gather+scatter
inside one GPU. "vLLM views" rows use vLLM's per-layer `[B, H, N, C]` views over one strided
buffer (what the vLLM connector registers). Prints a table and writes JSON. Without a GPU it
says so and exits 0; NCCL runs only with two GPUs and cupy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "tests" / "gpu" / "kv_server.py"
SECRET = "cd" * 32
LAYOUT = {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128, "dtype": "bfloat16",
          "block_size": 16}


def gbps(nbytes: int, seconds: list[float]) -> float:
    return nbytes / min(seconds) / 1e9


def d2d(kv: list[Any], n: int, repeat: int) -> list[float]:
    import torch

    src = torch.arange(n, device="cuda")
    dst = torch.arange(n, 2 * n, device="cuda")
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for t in kv:
            t.index_copy_(1, dst, t.index_select(1, src))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def remote(transport: str, visible: str, n: int, num_blocks: int, repeat: int,
           views: str = "engine") -> list[float]:
    from meshd.kv_transfer.auth import SharedSecretAuthenticator
    from meshd.kv_transfer.layout import BlockLayout
    from meshd.kv_transfer.transport import Peer, make_client

    layout = BlockLayout.from_dict(LAYOUT)
    held = {f"r{i}": list(range(n)) for i in range(repeat)}
    args = {"transport": transport, "views": views, "layout": LAYOUT, "num_blocks": num_blocks,
            "seed": 1, "secret": SECRET, "held": held}
    proc = subprocess.Popen([sys.executable, str(SERVER), json.dumps(args)],
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": visible},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().split()[1])
        sys.path.insert(0, str(SERVER.parent))
        from kv_server import make_gpu_kv

        local = make_gpu_kv(layout, num_blocks, None, views)
        client = make_client(transport, local, layout,
                             SharedSecretAuthenticator(bytes.fromhex(SECRET), "bench"),
                             views=views)
        times = []
        for i in range(repeat):
            t0 = time.perf_counter()
            res = client.fetch(Peer("127.0.0.1", port), f"r{i}", list(range(n)),
                               list(range(n, 2 * n)), 120.0)
            times.append(time.perf_counter() - t0)
            if not res.ok:
                raise RuntimeError(f"{transport}: {res.error}")
        client.close()
        return times
    finally:
        proc.kill()
        proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=256)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kv_transfer_gpu.json"))
    a = p.parse_args()
    try:
        import torch
    except ImportError:
        print("torch is not installed: no GPU benchmark here")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA GPU visible: nothing to measure (run on a GPU host)")
        return 0
    from meshd.kv_transfer.layout import BlockLayout

    layout = BlockLayout.from_dict(LAYOUT)
    n, num_blocks = a.blocks, 2 * a.blocks
    nbytes = n * layout.bytes_per_block
    kv = [torch.randn(layout.tensor_shape(num_blocks), device="cuda").to(torch.bfloat16)
          for _ in range(layout.num_layers)]
    rows: dict[str, Any] = {"d2d copy (1 GPU)": d2d(kv, n, a.repeat)}
    del kv
    rows["cuda_ipc (same GPU)"] = remote("cuda_ipc", "0", n, num_blocks, a.repeat)
    rows["cuda_ipc vLLM views (same GPU)"] = remote("cuda_ipc", "0", n, num_blocks, a.repeat,
                                                    "vllm")
    rows["tcp staged via host (loopback)"] = remote("tcp", "0", n, num_blocks, a.repeat)
    rows["tcp staged vLLM views"] = remote("tcp", "0", n, num_blocks, a.repeat, "vllm")
    if torch.cuda.device_count() >= 2:
        rows["cuda_ipc (GPU1 -> GPU0)"] = remote("cuda_ipc", "1,0", n, num_blocks, a.repeat)
        try:
            import cupy  # noqa: F401

            rows["nccl (GPU1 -> GPU0)"] = remote("nccl", "1,0", n, num_blocks, a.repeat)
        except ImportError:
            print("cupy is not installed: skipping nccl")
    else:
        print("one GPU: skipping NCCL (it refuses two ranks on one GPU)")
    print(f"{n} blocks, {nbytes / 2**20:.0f} MiB per transfer, best of {a.repeat}")
    print(f"{'path':28} {'GB/s':>8} {'best ms':>9} {'median ms':>10}")
    result = {"device": torch.cuda.get_device_name(0), "blocks": n, "bytes": nbytes,
              "layout": LAYOUT, "results": {}}
    for name, times in rows.items():
        s = sorted(times)
        print(f"{name:28} {gbps(nbytes, s):8.1f} {s[0] * 1e3:9.2f} {s[len(s) // 2] * 1e3:10.2f}")
        result["results"][name] = {"gbps": gbps(nbytes, s), "seconds": times}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
