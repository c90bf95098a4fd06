"""Discrete-event loop: replays a trace through a routing policy and a simulated cluster.

Events live in one heap ordered by (time, insertion number), so runs are deterministic. Kinds:
an arrival (the policy decides at that instant from fresh `WorkerView`s — built by
`scheduler.views.build_view`, as the live gateway's are — the prefix index and, for MoE
requests, their expert statistics), a worker's iteration end, and a KV transfer's end. After
every change to a worker's cache its KV events are applied to the prefix index the policy reads,
instantly and in order, as a live worker's would be. The loop stops when the heap is empty or
after `max_events` events.

Disaggregated flow (P prefills, D decodes): P finishes the prompt (its token is the first token);
D pins the prompt's blocks when they fit (FIFO), pulls only the blocks it does not cache over P's
link (one transfer at a time per P, FIFO), then P unpins its copy and the request joins D's
batch at D's next iteration. The gap from the first to the second token includes the transfer.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from meshd.scheduler.prefix_index import PrefixIndex
from meshd.scheduler.sim.cluster import ClusterConfig, views, worker_facts
from meshd.scheduler.sim.engine import Job, SimWorker
from meshd.scheduler.sim.records import RequestRecord, WorkerStats
from meshd.scheduler.sim.trace import TraceRequest, block_hashes
from meshd.scheduler.types import Decision, NoWorkerAvailable, RequestView, WorkerView

_ARRIVAL, _ITER_END, _XFER_END = 0, 1, 2
_NO_EXPERTS: dict[int, int] = {}


class RoutingPolicy(Protocol):
    """What the simulator drives: `meshd.scheduler.router.Router` satisfies it."""

    def decide(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision: ...


@dataclass(frozen=True, slots=True)
class SimResult:
    records: list[RequestRecord]
    workers: dict[str, WorkerStats]
    duration_s: float  # time of the last event
    events: int
    truncated: bool  # stopped by max_events
    block_size: int


@dataclass(slots=True)
class _Transfer:
    job: Job
    p: SimWorker
    d: SimWorker
    p_scratch: int


class Simulator:
    """One run: `Simulator(cluster, policy, index).run(trace)`. Single use."""

    def __init__(self, cluster: ClusterConfig, policy: RoutingPolicy,
                 index: PrefixIndex | None = None, max_events: int = 50_000_000,
                 typical_prompt_tokens: int = 8192) -> None:
        self.cluster = cluster
        self.policy = policy
        self.index = index
        self.max_events = max_events
        self.workers = cluster.build()
        self._by_id = {w.worker_id: w for w in self.workers}
        self._facts = worker_facts(cluster, self.workers,
                                   cluster.cost.view_params(typical_prompt_tokens))
        self._heap: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self._link_free = {w.worker_id: 0.0 for w in self.workers}
        self._pending: dict[str, list[_Transfer]] = {w.worker_id: [] for w in self.workers}
        if index is not None:
            for w in self.workers:
                index.add_worker(w.worker_id)

    def _push(self, t: float, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, payload))

    def run(self, trace: Sequence[TraceRequest]) -> SimResult:
        records = [RequestRecord(r.request_id, r.arrival_s, r.input_tokens, r.output_tokens)
                   for r in trace]
        for i, r in enumerate(trace):
            self._push(r.arrival_s, _ARRIVAL, i)
        n = 0
        now = 0.0
        while self._heap and n < self.max_events:
            now, _, kind, payload = heapq.heappop(self._heap)
            n += 1
            if kind == _ARRIVAL:
                assert isinstance(payload, int)
                self._arrive(now, trace[payload], records[payload])
            elif kind == _ITER_END:
                assert isinstance(payload, tuple)
                self._iteration_end(now, *payload)
            else:
                assert isinstance(payload, _Transfer)
                self._transfer_end(now, payload)
        return SimResult(records, {w.worker_id: w.stats for w in self.workers}, now, n,
                         bool(self._heap), self.cluster.block_size)

    # -- handlers ------------------------------------------------------------------------------
    def _arrive(self, now: float, req: TraceRequest, rec: RequestRecord) -> None:
        hashes = block_hashes(req, self.cluster.block_size)
        view = RequestView(request_id=req.request_id, model=self.cluster.model,
                           num_prompt_tokens=req.input_tokens, block_hashes=hashes,
                           max_tokens=req.output_tokens,
                           experts=dict(req.experts) if req.experts else _NO_EXPERTS)
        try:
            d = self.policy.decide(view, views(self._facts, self.workers))
        except NoWorkerAvailable as e:
            rec.dropped = f"no worker: {e}"
            return
        p_worker = self._by_id[d.prefill]
        rec.prefill_worker, rec.decode_worker = d.prefill, d.decode
        rec.disaggregated = d.prefill != d.decode
        rec.predicted_cached_tokens = d.cached_tokens
        p_worker.enqueue(Job(rec, hashes, decode_here=not rec.disaggregated))
        self._kick(p_worker, now)

    def _kick(self, w: SimWorker, now: float) -> None:
        """Start `w` if idle, or cut its decode chunk so new work joins at the next step."""
        if w.current is None:
            it = w.start(now)
            self._sync(w)
            if it is not None:
                self._push(it.end_s, _ITER_END, (w, w.generation))
        elif w.interrupt(now):
            assert w.current is not None
            self._push(w.current.end_s, _ITER_END, (w, w.generation))

    def _iteration_end(self, now: float, w: SimWorker, generation: int) -> None:
        if generation != w.generation or w.current is None:
            return  # superseded by an interrupt
        handoff, _ = w.finish(now)
        self._sync(w)
        for job in handoff:
            d = self._by_id[job.rec.decode_worker]
            self._pending[d.worker_id].append(_Transfer(job, w, d, job.scratch))
            self._place(d, now)
        self._place(w, now)  # freed blocks may let transfers into w
        self._kick(w, now)

    def _place(self, d: SimWorker, now: float) -> None:
        """Pin blocks on `d` for waiting transfers (FIFO) and start them on their P's link."""
        queue = self._pending[d.worker_id]
        while queue:
            tr = queue[0]
            job = tr.job
            scratch = d.scratch_blocks(job, decode=True)
            if not d.cache.can_acquire(job.hashes, scratch):
                if d.cache.used() == 0:
                    queue.pop(0)  # can never fit on an empty worker
                    job.rec.dropped = "kv capacity"
                    tr.p.cache.release(job.hashes, tr.p_scratch)
                    self._sync(tr.p)
                    self._kick(tr.p, now)
                    continue
                return
            queue.pop(0)
            hit = d.cache.match(job.hashes)
            d.cache.acquire(job.hashes, scratch)
            job.scratch = scratch
            d.incoming += 1
            self._sync(d)
            tokens = job.rec.prompt_tokens - hit * d.cache.block_size
            job.rec.transfer_tokens = tokens
            tr.p.stats.transfer_out_tokens += tokens
            start = max(now, self._link_free[tr.p.worker_id])
            end = start + self.cluster.cost.transfer_s(tokens)
            self._link_free[tr.p.worker_id] = end
            self._push(end, _XFER_END, tr)

    def _transfer_end(self, now: float, tr: _Transfer) -> None:
        tr.p.cache.release(tr.job.hashes, tr.p_scratch)
        self._sync(tr.p)
        tr.d.cache.commit(tr.job.hashes)
        self._sync(tr.d)
        tr.d.incoming -= 1
        tr.d.joining.append(tr.job)
        self._kick(tr.d, now)
        self._place(tr.p, now)
        self._kick(tr.p, now)

    def _sync(self, w: SimWorker) -> None:
        """Deliver `w`'s pending KV events to the prefix index."""
        events = w.cache.events
        if events:
            if self.index is not None:
                self.index.apply_events(w.worker_id, events)
            events.clear()
