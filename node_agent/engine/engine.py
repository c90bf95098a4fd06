"""The embedded engine: a synchronous step API over scheduler, block manager and model runner.

Not thread-safe: one thread (e.g. the HTTP server's engine thread) calls every method. Each
`step()` schedules, runs one forward pass, samples and returns per-request deltas.

Disaggregation hooks:
- prefill side: `EngineRequest.hold_blocks_on_finish`; when such a request finishes by the
  length cap (vLLM's rule: EOS or abort free at once) its blocks stay allocated and their ids
  come back in `RequestOutput.held_block_ids` until `release_held(request_id)`.
- decode side: `allocate_for_import(id, prompt)` returns fresh block ids for the prompt's full
  blocks except that a last token always stays to compute (`(len-1) // block_size` blocks);
  the caller writes the pulled KV into `kv_caches[layer][:, block_id]`, then calls
  `add_request(request, imported=True)`, or `free_import(id)` on failure.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from meshd.node_agent.engine.api import (
    EngineRequest,
    EngineStats,
    KVLayout,
    RequestOutput,
    TokenLogprob,
)
from meshd.node_agent.engine.block_manager import BlockManager, NoFreeBlocksError
from meshd.node_agent.engine.config import EngineConfig
from meshd.node_agent.engine.events import KVEvent
from meshd.node_agent.engine.runner import Chunk, ModelRunner
from meshd.node_agent.engine.sampler import confidence_of, logprobs_of, sample
from meshd.node_agent.engine.scheduler import ScheduledSeq, Scheduler
from meshd.node_agent.engine.sequence import Sequence
from meshd.node_agent.engine.stopping import check_stop, take_text_delta
from meshd.node_agent.engine.timings import RequestTimings
from meshd.node_agent.engine.tokenizer import Tokenizer, load_tokenizer
from meshd.node_agent.engine.weights import load_hf_model, random_model
from meshd.scheduler.block_hash import BlockHasher

__all__ = ["Engine", "NoFreeBlocksError"]


class Engine:
    """CPU torch engine speaking vLLM's contracts. See module docstring for the hooks."""

    def __init__(self, config: EngineConfig,
                 on_kv_event: Callable[[KVEvent], None] | None = None) -> None:
        self.config = config
        if config.model_path:
            model_cfg, model = load_hf_model(config.model_path, config.dtype)
        else:
            model_cfg, model = config.model, random_model(config.model, config.seed, config.dtype)
        self.model_config = model_cfg
        self.tokenizer: Tokenizer = load_tokenizer(config.model_path or None)
        self.eos_token_id = (model_cfg.eos_token_id if model_cfg.eos_token_id is not None
                             else self.tokenizer.eos_token_id)
        self._events: list[KVEvent] = []
        self._on_kv_event = on_kv_event
        self.blocks = BlockManager(config.num_blocks, config.block_size, self._emit)
        self.scheduler = Scheduler(config, self.blocks)
        self.runner = ModelRunner(model, config.num_blocks, config.block_size, config.dtype)
        self.hasher = BlockHasher(config.block_size, config.prefix_hash_seed)
        self._gen = torch.Generator().manual_seed(config.seed)
        self._seqs: dict[str, Sequence] = {}
        self._held: dict[str, Sequence] = {}
        self._imports: dict[str, tuple[tuple[int, ...], list[int]]] = {}
        self._pending: list[RequestOutput] = []
        self._counters = {"prompt": 0, "generation": 0, "forwarded": 0, "steps": 0}
        e = model_cfg.num_experts
        self._expert_counts = torch.zeros(model_cfg.num_layers, e, dtype=torch.int64)
        self.timings = RequestTimings()  # vLLM's request timing histograms

    # -- accessors ---------------------------------------------------------------------------
    @property
    def kv_caches(self) -> list[torch.Tensor]:
        """Per-layer cache tensors (`layout.shape`); safe to touch only between steps."""
        return self.runner.kv_caches

    @property
    def layout(self) -> KVLayout:
        return self.runner.layout

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self._pending)

    def take_kv_events(self) -> list[KVEvent]:
        """Block events since the last call (buffered only with `enable_kv_events` and no
        `on_kv_event` callback)."""
        out, self._events = self._events, []
        return out

    def stats(self) -> EngineStats:
        c = self._counters
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_held=len(self._held), kv_usage=self.blocks.usage(),
            prefix_queries=self.blocks.stats.queries, prefix_hits=self.blocks.stats.hits,
            prompt_tokens=c["prompt"], generation_tokens=c["generation"],
            forwarded_tokens=c["forwarded"], preemptions=self.scheduler.num_preemptions,
            steps=c["steps"], num_waiting_tokens=self.scheduler.queued_prefill_tokens(),
            histograms=self.timings.snapshot(),
            expert_counts=tuple(tuple(r) for r in self._expert_counts.tolist()))

    # -- requests ----------------------------------------------------------------------------
    def add_request(self, request: EngineRequest, imported: bool = False) -> None:
        """Queue `request`. Raises ValueError for a duplicate id, an empty or too long prompt,
        token ids outside the vocabulary, or (imported) no matching `allocate_for_import`."""
        rid = request.request_id
        self._check_new(rid, request.prompt_token_ids, allow_import=imported)
        p = request.sampling
        need = min(len(request.prompt_token_ids) + p.max_tokens, self.model_config.max_model_len)
        if -(-need // self.config.block_size) > self.config.num_blocks:
            raise ValueError(f"request {rid}: needs more KV blocks than the cache has "
                             f"({self.config.num_blocks} x {self.config.block_size} tokens)")
        gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
        seq = Sequence(request, gen)
        self.hasher.extend(seq.block_hashes, seq.token_ids)
        if imported:
            prompt, block_ids = self._imports.pop(rid)
            if prompt != tuple(request.prompt_token_ids):
                self._imports[rid] = (prompt, block_ids)
                raise ValueError(f"request {rid}: prompt differs from allocate_for_import's")
            seq.block_table = block_ids
            seq.num_computed = seq.num_cached_tokens = len(block_ids) * self.config.block_size
        self._seqs[rid] = seq
        self.scheduler.add(seq)

    def _check_new(self, rid: str, prompt: tuple[int, ...], allow_import: bool) -> None:
        if rid in self._seqs or rid in self._held or (rid in self._imports and not allow_import):
            raise ValueError(f"request_id {rid!r} is already in use")
        if allow_import and rid not in self._imports:
            raise ValueError(f"request {rid}: imported=True without allocate_for_import")
        if not prompt:
            raise ValueError(f"request {rid}: prompt_token_ids must not be empty")
        if len(prompt) >= self.model_config.max_model_len:
            raise ValueError(f"request {rid}: prompt has {len(prompt)} tokens, max_model_len is "
                             f"{self.model_config.max_model_len}")
        vocab = self.model_config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"request {rid}: token ids must be in 0..{vocab - 1}")

    def abort(self, request_id: str) -> bool:
        """Stop a request, release a held one or drop an import; False if the id is unknown.
        A running/waiting request yields a final "abort" output on the next `step()`."""
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            self.timings.forget(request_id)
            self.scheduler.remove(seq)
            self.scheduler.release(seq)
            seq.finish_reason = "abort"
            self._pending.append(self._output(seq, (), None, finished=True))
            return True
        return self.release_held(request_id) or self.free_import(request_id)

    def release_held(self, request_id: str) -> bool:
        """Free the blocks kept for a finished `hold_blocks_on_finish` request."""
        seq = self._held.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.release(seq)
        return True

    def allocate_for_import(self, request_id: str, prompt_token_ids: tuple[int, ...]) -> list[int]:
        """Fresh block ids (ref-held) for the prompt's importable full blocks, in order.
        Raises NoFreeBlocksError if the cache is too full, ValueError for a bad request."""
        prompt = tuple(prompt_token_ids)
        self._check_new(request_id, prompt, allow_import=False)
        block_ids = self.blocks.allocate((len(prompt) - 1) // self.config.block_size)
        self._imports[request_id] = (prompt, block_ids)
        return list(block_ids)

    def free_import(self, request_id: str) -> bool:
        """Give back blocks from `allocate_for_import` when the transfer failed."""
        entry = self._imports.pop(request_id, None)
        if entry is None:
            return False
        self.blocks.free(entry[1])
        return True

    def reset_prefix_cache(self) -> None:
        self.blocks.clear_cache()

    # -- stepping ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step and forward pass; returns the outputs it produced."""
        outputs, self._pending = self._pending, []
        plan = self.scheduler.schedule()
        sched = plan.scheduled
        if not sched:
            return outputs
        moe = self.model_config.is_moe and self.config.record_experts
        chunks = [Chunk(s.seq.token_ids[s.seq.num_computed:s.seq.num_computed + s.num_new],
                        s.seq.num_computed, s.seq.block_table, s.samples) for s in sched]
        self.timings.scheduled(sched)
        result = self.runner.execute(chunks, record_routes=moe)
        self.timings.stepped()
        self._counters["steps"] += 1
        self._counters["forwarded"] += plan.num_tokens
        if result.routes is not None:
            self._count_experts(sched, result.routes)
        row = 0
        for s in sched:
            seq, samples = s.seq, s.samples
            seq.num_computed += s.num_new
            self._cache_full_blocks(seq)
            if samples:
                outputs.append(self._sample(seq, result.logits[row]))
                row += 1
        return outputs

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> RequestOutput:
        p = seq.request.sampling
        first = seq.num_output == 0
        token = sample(logits, p, seq.generator or self._gen)
        lp = logprobs_of(logits, token, p.logprobs) if p.logprobs is not None else None
        conf = (confidence_of(logits),) if p.confidence else None
        seq.token_ids.append(token)
        self.hasher.extend(seq.block_hashes, seq.token_ids)
        self._counters["generation"] += 1
        self.timings.token(seq, first)
        if first:
            self._counters["prompt"] += seq.num_prompt
        check_stop(seq, token, self.eos_token_id, self.tokenizer, self.model_config.max_model_len)
        held: tuple[int, ...] | None = None
        if seq.finish_reason is not None:
            self.timings.forget(seq.request_id)
            self.scheduler.remove(seq)
            del self._seqs[seq.request_id]
            if seq.request.hold_blocks_on_finish and seq.finish_reason == "length":
                self._held[seq.request_id] = seq
                held = tuple(seq.block_table)
            else:
                self.scheduler.release(seq)
        out = self._output(seq, (token,), (lp,) if lp else None, seq.finish_reason is not None,
                           held, expert_counts=first, confidence=conf)
        return out

    def _output(self, seq: Sequence, new: tuple[int, ...], lps: tuple[TokenLogprob, ...] | None,
                finished: bool, held: tuple[int, ...] | None = None,
                expert_counts: bool = False,
                confidence: tuple[float, ...] | None = None) -> RequestOutput:
        counts = None
        if expert_counts and seq.expert_counts is not None:
            counts = tuple(tuple(r) for r in seq.expert_counts.tolist())
        return RequestOutput(
            request_id=seq.request_id, new_token_ids=new, text_delta=take_text_delta(seq),
            finished=finished, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            logprobs=lps, num_prompt_tokens=seq.num_prompt,
            num_cached_tokens=seq.num_cached_tokens, num_output_tokens=seq.num_output,
            held_block_ids=held, prompt_expert_counts=counts, confidence=confidence)

    def _cache_full_blocks(self, seq: Sequence) -> None:
        if not self.config.enable_prefix_caching:
            return
        bs = self.config.block_size
        upto = min(seq.num_computed // bs, len(seq.block_hashes))
        lo = seq.num_cached_blocks
        if upto <= lo:
            return
        parent = seq.block_hashes[lo - 1] if lo else None
        self.blocks.cache_blocks(seq.block_table[lo:upto], seq.block_hashes[lo:upto], parent,
                                 seq.token_ids[lo * bs:upto * bs])
        seq.num_cached_blocks = upto

    def _count_experts(self, sched: tuple[ScheduledSeq, ...], routes: list[torch.Tensor]) -> None:
        e = self.model_config.num_experts
        self._expert_counts += torch.stack(
            [torch.bincount(r.flatten(), minlength=e) for r in routes])
        start = 0
        for s in sched:
            seq = s.seq
            n_prompt = max(0, min(seq.num_computed + s.num_new, seq.num_prompt) - seq.num_computed)
            if n_prompt and seq.num_output == 0:
                part = torch.stack([torch.bincount(r[start:start + n_prompt].flatten(),
                                                   minlength=e) for r in routes])
                seq.expert_counts = part if seq.expert_counts is None else seq.expert_counts + part
            start += s.num_new

    def _emit(self, event: KVEvent) -> None:
        if self._on_kv_event is not None:
            self._on_kv_event(event)
        elif self.config.enable_kv_events:
            self._events.append(event)
