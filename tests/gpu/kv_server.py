"""Serve seeded CUDA KV blocks over a GPU transport until stdin closes (a peer process for the
GPU tests and `benchmarks/kv_transfer_gpu.py`: CUDA IPC and NCCL both need two processes).

    python tests/gpu/kv_server.py '{"transport": "cuda_ipc", "layout": {...}, "num_blocks": 64,
                                    "seed": 1, "secret": "<hex>", "held": {"r1": [3, 1, 7]}}'

Prints `PORT <n>` once listening, then `SENT <request_id>` per confirmed transfer.
"""

from __future__ import annotations

import json
import sys
import threading

import torch

from meshd.kv_transfer.auth import SharedSecretAuthenticator
from meshd.kv_transfer.layout import BlockLayout
from meshd.kv_transfer.testing import DictSource
from meshd.kv_transfer.transport import make_server


def make_gpu_kv(layout: BlockLayout, num_blocks: int, seed: int) -> list[torch.Tensor]:
    """Seeded per-layer KV on cuda:0, bit-identical in any process (generated on the CPU)."""
    gen = torch.Generator().manual_seed(seed)
    shape = layout.tensor_shape(num_blocks)
    dtype = getattr(torch, layout.dtype)
    return [torch.randn(shape, generator=gen).to(dtype).cuda() for _ in range(layout.num_layers)]


def main() -> None:
    args = json.loads(sys.argv[1])
    layout = BlockLayout.from_dict(args["layout"])
    kv = make_gpu_kv(layout, args["num_blocks"], args["seed"])
    torch.cuda.synchronize()

    class Source(DictSource):
        def on_sent(self, request_id: str) -> None:
            super().on_sent(request_id)
            print("SENT", request_id, flush=True)

    auth = SharedSecretAuthenticator(bytes.fromhex(args["secret"]), "server")
    server = make_server(args["transport"], kv, layout, auth, Source(args["held"]))
    print("PORT", server.address.port, flush=True)
    done = threading.Event()

    def wait_stdin() -> None:
        sys.stdin.read()
        done.set()

    threading.Thread(target=wait_stdin, daemon=True).start()
    done.wait()
    server.close()


if __name__ == "__main__":
    main()
