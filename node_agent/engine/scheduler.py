"""Continuous batching with chunked prefill and preemption by recompute (vLLM v1 style).

Each step has a token budget (`max_num_batched_tokens`). Running sequences go first, in order:
each gets `min(remaining, budget)` tokens (a decode is one token; a long prompt is split into
chunks over several steps). When blocks run out, the newest running sequence is preempted: its
blocks are freed (full blocks stay in the prefix cache) and it is recomputed later. Waiting
sequences are admitted in FIFO order only in steps without preemption, after a prefix-cache
lookup that always leaves at least one token to compute (for logits).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from meshd.node_agent.engine.block_manager import BlockManager
from meshd.node_agent.engine.config import EngineConfig
from meshd.node_agent.engine.sequence import SeqStatus, Sequence


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    """Compute tokens `[seq.num_computed, seq.num_computed + num_new)` of `seq` this step."""

    seq: Sequence
    num_new: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the known tokens (a new token follows)."""
        return self.seq.num_computed + self.num_new == self.seq.num_tokens


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledSeq, ...]
    num_preempted: int

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.scheduled)


class Scheduler:
    """Owns the waiting queue and running list; takes and returns blocks via `BlockManager`."""

    def __init__(self, cfg: EngineConfig, blocks: BlockManager) -> None:
        self.cfg = cfg
        self.blocks = blocks
        self.bs = cfg.block_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out of the queues (blocks untouched: see `release`)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def release(self, seq: Sequence) -> None:
        """Return `seq`'s blocks to the pool."""
        self.blocks.free(seq.block_table)
        seq.block_table = []

    def queued_prefill_tokens(self) -> int:
        """Prompt tokens still to prefill: the uncomputed tokens of every waiting sequence
        (whole prompts, or what a preempted or imported one still needs) plus the uncomputed
        rest of running sequences that have not sampled their first token since (re)starting
        (the gauge vLLM lacks, `meshd_engine_queued_prefill_tokens`). O(sequences)."""
        n = sum(s.num_tokens - s.num_computed for s in self.waiting)
        for s in self.running:
            rest = s.num_tokens - s.num_computed
            if rest > 1 or s.num_output == 0:  # a decoding sequence has exactly 1 left
                n += rest
        return n

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.bs)

    def schedule(self) -> SchedulerOutput:
        budget = self.cfg.max_num_batched_tokens
        out: list[ScheduledSeq] = []
        preempted = 0
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            need = self._blocks_for(seq.num_computed + n) - len(seq.block_table)
            while not self.blocks.can_allocate(need):
                victim = self.running.pop()
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                break
            if need > 0:
                seq.block_table.extend(self.blocks.allocate(need))
            out.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1
        while (self.waiting and budget > 0 and not preempted
               and len(self.running) < self.cfg.max_num_seqs):
            seq = self.waiting[0]
            n = self._admit(seq, budget)
            if n == 0:
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.append(ScheduledSeq(seq, n))
            budget -= n
        return SchedulerOutput(tuple(out), preempted)

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Take prefix hits and blocks for `seq`'s first chunk; 0 if it does not fit now."""
        hit: list[int] = []
        if not seq.block_table and self.cfg.enable_prefix_caching:
            max_hit_blocks = (seq.num_tokens - 1) // self.bs
            hit = self.blocks.lookup(seq.block_hashes[:max_hit_blocks])
        computed = seq.num_computed if seq.block_table else len(hit) * self.bs
        n = min(seq.num_tokens - computed, budget)
        need = self._blocks_for(computed + n) - len(seq.block_table) - len(hit)
        revived = sum(1 for b in hit if self.blocks.ref_count(b) == 0)
        if not self.blocks.can_allocate(need + revived):
            return 0
        if not seq.block_table:
            if self.cfg.enable_prefix_caching:
                self.blocks.record_query(seq.num_tokens, len(hit) * self.bs)
            self.blocks.touch(hit)
            seq.block_table = list(hit)
            seq.num_cached_blocks = len(hit)
            seq.num_computed = computed
            if seq.num_output == 0:
                seq.num_cached_tokens = computed
        seq.block_table.extend(self.blocks.allocate(need))
        return n

    def _preempt(self, seq: Sequence) -> None:
        self.release(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
