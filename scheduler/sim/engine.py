"""One simulated worker: a vLLM-V1-like continuous-batching engine over a `BlockCache`.

Each iteration is either *mixed* (one decode step for the running batch plus prefill chunks of
waiting requests up to `token_budget` tokens in all, as chunked prefill does) or, when no prompt
is waiting, a *decode chunk* of k steps at once (k = the fewest tokens any running request still
needs). Batch membership is fixed within a chunk, so its step times form an arithmetic series
(context grows by the batch size each step); new work `interrupt`s a chunk at the next step
boundary, so the result equals step-by-step simulation.

Memory: a request is admitted (FIFO, head-of-line blocking) once its prompt blocks, partial
block and, when it also decodes here, its output blocks fit; they stay pinned until it finishes
here. The worker never talks to other workers: the simulator moves jobs between them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from meshd.scheduler.sim.cache import BlockCache
from meshd.scheduler.sim.records import RequestRecord, WorkerStats
from meshd.scheduler.sim.timing import EngineTiming
from meshd.scheduler.types import Role


@dataclass(slots=True)
class Job:
    """A request in flight; owned by the worker that currently holds it."""

    rec: RequestRecord
    hashes: tuple[int, ...]
    decode_here: bool  # colocated: decodes on the prefill worker
    scratch: int = 0  # anonymous blocks pinned on the current worker
    done_tokens: int = 0  # prompt tokens computed or cached so far
    remaining: int = 0  # output tokens still to generate
    ctx: int = 0  # tokens in the KV of this sequence
    last_token_s: float = 0.0


@dataclass(slots=True)
class Iteration:
    """The iteration a worker is running; `end_s` moves earlier when a chunk is interrupted."""

    start_s: float
    end_s: float
    prefill: list[tuple[Job, int]] = field(default_factory=list)  # (job, tokens this chunk)
    steps: int = 0  # decode steps
    first_step_s: float = 0.0
    step_slope_s: float = 0.0  # how much each decode step is longer than the one before


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class SimWorker:
    """Queues, running batch and cache of one worker. Mutated only by the `Simulator`."""

    def __init__(self, worker_id: str, role: Role, cache: BlockCache, cost: EngineTiming,
                 token_budget: int, max_num_seqs: int, max_chunk_steps: int) -> None:
        self.worker_id = worker_id
        self.role = role
        self.cache = cache
        self.cost = cost
        self.token_budget = token_budget
        self.max_num_seqs = max_num_seqs
        self.max_chunk_steps = max_chunk_steps
        self.waiting: deque[Job] = deque()  # prompts not yet admitted
        self.prefilling: list[Job] = []  # admitted, prompt partly computed
        self.running: list[Job] = []  # decoding
        self.joining: list[Job] = []  # KV arrived, join `running` at the next iteration
        self.incoming = 0  # jobs whose blocks are pinned here while their KV is in flight
        self.queued_tokens = 0  # prompt tokens still to prefill: waiting + rest of prefilling
        self.current: Iteration | None = None
        self.generation = 0  # bumps when `current.end_s` changes (stale end events are skipped)
        self.stats = WorkerStats()

    # -- queue entry ---------------------------------------------------------------------------
    def enqueue(self, job: Job) -> None:
        """Queue a prompt for prefill here (FIFO)."""
        self.waiting.append(job)
        self.queued_tokens += job.rec.prompt_tokens

    def scratch_blocks(self, job: Job, decode: bool) -> int:
        """Anonymous blocks the job needs here: partial prompt block (+ output if decoding)."""
        tokens = job.rec.prompt_tokens + (job.rec.output_tokens if decode else 0)
        return max(0, _blocks(tokens, self.cache.block_size) - len(job.hashes))

    def check_integrity(self) -> None:
        want = (sum(j.rec.prompt_tokens for j in self.waiting)
                + sum(j.rec.prompt_tokens - j.done_tokens for j in self.prefilling))
        assert self.queued_tokens == want, (self.worker_id, self.queued_tokens, want)

    def load(self) -> tuple[int, int]:
        """(running, waiting) as a `/metrics` scrape would report them."""
        return (len(self.running) + len(self.prefilling) + len(self.joining) + self.incoming,
                len(self.waiting))

    # -- iterations ----------------------------------------------------------------------------
    def start(self, now: float) -> Iteration | None:
        """Begin the next iteration at `now` (the worker must be idle); None if nothing to do."""
        assert self.current is None
        self.running.extend(self.joining)
        self.joining.clear()
        self._admit(now)
        if self.prefilling:
            it = self._mixed(now)
        elif self.running:
            it = self._decode_chunk(now)
        else:
            return None
        self.current = it
        self.generation += 1
        self.stats.iterations += 1
        return it

    def _admit(self, now: float) -> None:
        cache, bs = self.cache, self.cache.block_size
        while self.waiting and len(self.running) + len(self.prefilling) < self.max_num_seqs:
            job = self.waiting[0]
            scratch = self.scratch_blocks(job, job.decode_here)
            if not cache.can_acquire(job.hashes, scratch):
                if cache.used() or self.prefilling or self.running:
                    return  # head-of-line: wait for blocks to free
                self.waiting.popleft()  # cannot fit even on an empty worker
                self.queued_tokens -= job.rec.prompt_tokens
                job.rec.dropped = "kv capacity"
                continue
            hit = cache.match(job.hashes)
            cache.acquire(job.hashes, scratch)
            self.waiting.popleft()
            job.scratch = scratch
            job.done_tokens = min(hit * bs, job.rec.prompt_tokens - 1)
            self.queued_tokens -= job.done_tokens
            job.rec.cached_tokens = job.done_tokens
            job.rec.prefill_start_s = now
            self.prefilling.append(job)

    def _mixed(self, now: float) -> Iteration:
        cost = self.cost
        b = len(self.running)
        budget = max(1, self.token_budget - b)
        secs = cost.prefill_overhead_s
        it = Iteration(now, now)
        for job in self.prefilling:
            if budget <= 0:
                break
            n = min(job.rec.prompt_tokens - job.done_tokens, budget)
            budget -= n
            secs += cost.prefill_item_s(n, job.done_tokens)
            it.prefill.append((job, n))
        if b:
            secs += cost.decode_step_s(b, sum(j.ctx for j in self.running))
            it.steps = 1
        it.end_s = now + secs
        return it

    def _decode_chunk(self, now: float) -> Iteration:
        cost, run = self.cost, self.running
        b = len(run)
        k = min(self.max_chunk_steps, min(j.remaining for j in run))
        first = cost.decode_step_s(b, sum(j.ctx for j in run))
        slope = cost.decode_s_per_ctx_token * b
        it = Iteration(now, now, steps=k, first_step_s=first, step_slope_s=slope)
        it.end_s = now + self._chunk_s(it, k)
        return it

    @staticmethod
    def _chunk_s(it: Iteration, m: int) -> float:
        return m * it.first_step_s + it.step_slope_s * m * (m - 1) / 2

    def interrupt(self, now: float) -> bool:
        """Cut a running decode chunk at the first step boundary at or after `now`.

        Returns True when `current.end_s` moved (the caller reschedules the end event).
        """
        it = self.current
        if it is None or it.prefill or it.steps <= 1 or it.end_s <= now:
            return False
        lo, hi = 1, it.steps  # smallest m with start + chunk_s(m) >= now
        while lo < hi:
            mid = (lo + hi) // 2
            if it.start_s + self._chunk_s(it, mid) >= now:
                hi = mid
            else:
                lo = mid + 1
        if lo >= it.steps:
            return False
        it.steps = lo
        it.end_s = it.start_s + self._chunk_s(it, lo)
        self.generation += 1
        return True

    def finish(self, now: float) -> tuple[list[Job], list[Job]]:
        """Complete `current` at `now`: (jobs whose prefill ended and go elsewhere to decode,
        jobs finished here). Finished jobs' blocks are released; first tokens and gaps recorded.
        """
        it = self.current
        assert it is not None and abs(it.end_s - now) < 1e-9
        self.current = None
        st = self.stats
        st.busy_s += it.end_s - it.start_s
        finished = self._advance_decode(it) if it.steps else []
        handoff: list[Job] = []
        for job, n in it.prefill:
            job.done_tokens += n
            self.queued_tokens -= n
            st.prefill_tokens += n
            if job.done_tokens < job.rec.prompt_tokens:
                continue
            self.prefilling.remove(job)
            self.cache.commit(job.hashes)
            job.rec.first_token_s = job.last_token_s = now
            job.remaining = job.rec.output_tokens - 1
            job.ctx = job.rec.prompt_tokens + 1
            if job.remaining == 0:
                job.rec.end_s = now
                self.cache.release(job.hashes, job.scratch)
                finished.append(job)
            elif job.decode_here:
                self.running.append(job)
            else:
                handoff.append(job)
        return handoff, finished

    def _advance_decode(self, it: Iteration) -> list[Job]:
        m = it.steps
        first_end = it.start_s + (it.first_step_s if not it.prefill else it.end_s - it.start_s)
        rest = (it.end_s - first_end) / (m - 1) if m > 1 else 0.0
        done: list[Job] = []
        keep: list[Job] = []
        for job in self.running:
            job.rec.itl.append((first_end - job.last_token_s, 1))
            if m > 1:
                job.rec.itl.append((rest, m - 1))
            job.last_token_s = it.end_s
            job.remaining -= m
            job.ctx += m
            if job.remaining <= 0:
                job.rec.end_s = it.end_s
                self.cache.release(job.hashes, job.scratch)
                done.append(job)
            else:
                keep.append(job)
        self.stats.decode_tokens += m * len(self.running)
        self.running = keep
        return done
