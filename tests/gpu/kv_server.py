"""Serve seeded CUDA KV blocks over a transport until stdin closes (a peer process for the GPU
tests and `benchmarks/kv_transfer_gpu.py`: CUDA IPC and NCCL both need two processes).

    python tests/gpu/kv_server.py '{"transport": "cuda_ipc", "views": "engine",
                                    "layout": {...}, "num_blocks": 64, "seed": 1,
                                    "secret": "<hex>", "held": {"r1": [3, 1, 7]}}'

`views`: "engine" (meshd's `(2, B, N, H, D)` per layer) or "vllm" (vLLM's per-layer
`[B, H, N, C]` views, here strided views of one `[B, L, H, N, C]` buffer: blocks of a layer are
not contiguous, as with vLLM's BLHNC layout). Prints `PORT <n>` once listening, then
`SENT <request_id>` per confirmed transfer.
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


def make_gpu_kv(layout: BlockLayout, num_blocks: int, seed: int | None,
                views: str = "engine") -> list[torch.Tensor]:
    """Seeded per-layer KV on cuda:0, bit-identical in any process (generated on the CPU);
    zeros when seed is None."""
    dtype = getattr(torch, layout.dtype)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None

    def fill(shape: tuple[int, ...]) -> torch.Tensor:
        t = torch.randn(shape, generator=gen) if gen is not None else torch.zeros(shape)
        return t.to(dtype).cuda()

    if views == "engine":
        return [fill(layout.tensor_shape(num_blocks)) for _ in range(layout.num_layers)]
    backing = fill((num_blocks, layout.num_layers, layout.num_kv_heads, layout.block_size,
                    2 * layout.head_dim))
    return [backing[:, i] for i in range(layout.num_layers)]


def main() -> None:
    args = json.loads(sys.argv[1])
    layout = BlockLayout.from_dict(args["layout"])
    views = args.get("views", "engine")
    kv = make_gpu_kv(layout, args["num_blocks"], args["seed"], views)
    torch.cuda.synchronize()

    class Source(DictSource):
        def on_sent(self, request_id: str) -> None:
            super().on_sent(request_id)
            print("SENT", request_id, flush=True)

    auth = SharedSecretAuthenticator(bytes.fromhex(args["secret"]), "server")
    server = make_server(args["transport"], kv, layout, auth, Source(args["held"]), views=views)
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
