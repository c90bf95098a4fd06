"""Model runner: owns the KV cache tensors and turns a scheduled batch into one forward pass.

The runner knows nothing of requests: it takes per-sequence chunks (token ids, first position,
block table, whether logits are wanted) and returns fp32 logits for the rows that asked, plus
the MoE routing of every token when recording is on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from meshd.node_agent.engine.api import KVLayout
from meshd.node_agent.engine.model import AttnMetadata, DecoderModel, SeqSlice
from meshd.node_agent.engine.weights import DTYPES


@dataclass(frozen=True, slots=True)
class Chunk:
    """Tokens `token_ids` at positions `start_pos..` of one sequence whose blocks are `table`."""

    token_ids: Sequence[int]
    start_pos: int
    table: Sequence[int]
    want_logits: bool


@dataclass(frozen=True, slots=True)
class RunResult:
    logits: torch.Tensor  # (num chunks wanting logits, vocab) fp32, in chunk order
    routes: list[torch.Tensor] | None  # per MoE layer (T, top_k) expert ids, T in chunk order


class ModelRunner:
    """Allocates `layout.num_layers` cache tensors of `layout.shape` (zeros) at construction.

    `kv_caches` are plain tensors (not inference tensors) so that kv_transfer may read and write
    blocks in place between steps; never while `execute` runs.
    """

    def __init__(self, model: DecoderModel, num_blocks: int, block_size: int, dtype: str) -> None:
        cfg = model.cfg
        self.model = model
        self.layout = KVLayout(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads,
                               cfg.dim_per_head, dtype)
        self.kv_caches = [torch.zeros(self.layout.shape, dtype=DTYPES[dtype])
                          for _ in range(cfg.num_layers)]

    def execute(self, chunks: Sequence[Chunk], record_routes: bool = False) -> RunResult:
        bs = self.layout.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        prefills: list[SeqSlice] = []
        dec_index: list[int] = []
        dec_tables: list[Sequence[int]] = []
        dec_lens: list[int] = []
        last_rows: list[int] = []
        for c in chunks:
            start, n = len(ids), len(c.token_ids)
            ids.extend(c.token_ids)
            positions = range(c.start_pos, c.start_pos + n)
            pos.extend(positions)
            slots.extend(c.table[p // bs] * bs + p % bs for p in positions)
            ctx = c.start_pos + n
            nblk = -(-ctx // bs)
            if n == 1:
                dec_index.append(start)
                dec_tables.append(c.table[:nblk])
                dec_lens.append(ctx)
            else:
                table = torch.tensor(c.table[:nblk], dtype=torch.int64)
                prefills.append(SeqSlice(start, start + n, ctx, table))
            if c.want_logits:
                last_rows.append(start + n - 1)
        width = max((len(t) for t in dec_tables), default=0)
        meta = AttnMetadata(
            prefills=tuple(prefills),
            decode_index=torch.tensor(dec_index, dtype=torch.int64),
            decode_tables=torch.tensor([list(t) + [0] * (width - len(t)) for t in dec_tables],
                                       dtype=torch.int64).view(len(dec_tables), width),
            decode_lens=torch.tensor(dec_lens, dtype=torch.int64),
            slot_mapping=torch.tensor(slots, dtype=torch.int64))
        routes: list[torch.Tensor] | None = [] if record_routes else None
        hidden = self.model(torch.tensor(ids, dtype=torch.int64),
                            torch.tensor(pos, dtype=torch.int64), meta, self.kv_caches, routes)
        logits = self.model.compute_logits(hidden[torch.tensor(last_rows, dtype=torch.int64)])
        return RunResult(logits, routes if routes else None)
