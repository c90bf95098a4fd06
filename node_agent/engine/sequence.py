"""Mutable per-request state owned by the scheduler and engine (internal, not an API type)."""

from __future__ import annotations

import enum

import torch

from meshd.node_agent.engine.api import EngineRequest


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"


class Sequence:
    """Tokens (prompt then output), progress and blocks of one request.

    Invariants: `num_computed <= len(token_ids)`; `block_table` covers at least `num_computed`
    tokens; the first `num_cached_blocks` blocks are registered in the prefix cache;
    `block_hashes` holds the chained hashes of every full block of `token_ids`.
    """

    __slots__ = ("block_hashes", "block_table", "expert_counts", "finish_reason", "generator",
                 "num_cached_blocks", "num_cached_tokens", "num_computed",
                 "num_prompt", "prefix_offset", "prefix_text", "read_offset", "request",
                 "sent_text_len", "stable_text", "status", "stop_reason", "text", "token_ids")

    def __init__(self, request: EngineRequest, generator: torch.Generator | None) -> None:
        self.request = request
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt = len(self.token_ids)
        self.num_computed = 0
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []
        self.num_cached_blocks = 0
        self.num_cached_tokens = 0
        self.status = SeqStatus.WAITING
        self.generator = generator
        self.text = ""
        # Incremental detokenization (output-relative token offsets): `stable_text` is the
        # text of output[:read_offset]; `prefix_text` that of output[prefix_offset:read_offset],
        # the context the next window is decoded with.
        self.stable_text = ""
        self.prefix_text = ""
        self.prefix_offset = 0
        self.read_offset = 0
        self.sent_text_len = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.expert_counts: torch.Tensor | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    def reset_for_recompute(self) -> None:
        """After preemption: blocks were freed by the caller; everything is computed again."""
        self.num_computed = 0
        self.block_table = []
        self.num_cached_blocks = 0
        self.status = SeqStatus.WAITING
