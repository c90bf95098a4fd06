"""Router: the scheduler's top-level decision for one request.

    decision = router.decide(request, workers)

1. the prefix match is computed once (global index) and put on the request (typed state);
2. the decode selector picks D;
3. the P/D decider says whether to prefill elsewhere; if so the prefill selector picks P.
Selectors are profiles or baselines; with a baseline as `decode` and no index the router is the
baseline. `decide` mutates nothing but plugin counters and stateful baselines.
"""

from __future__ import annotations

from collections.abc import Sequence

from meshd.scheduler.pd import PDDecider
from meshd.scheduler.policy import Selection, Selector
from meshd.scheduler.prefix_index import PrefixIndex
from meshd.scheduler.types import Decision, RequestView, WorkerView


class Router:
    def __init__(self, decode: Selector, prefill: Selector | None = None,
                 pd: PDDecider | None = None, index: PrefixIndex | None = None,
                 medium: str | None = "GPU") -> None:
        """`prefill=None` or `pd=None`: always colocated on the decode pick."""
        self.decode = decode
        self.prefill = prefill
        self.pd = pd
        self.index = index
        self.medium = medium

    def with_prefix(self, request: RequestView) -> RequestView:
        """`request` with `cached_blocks` from the index (unchanged if already set or no index)."""
        if self.index is None or request.cached_blocks or not request.block_hashes:
            return request
        match = self.index.match(request.block_hashes, self.medium)
        return request.with_cached_blocks(match) if match else request

    def decide(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision:
        """Raises `NoWorkerAvailable` when no worker can decode the request."""
        req = self.with_prefix(request)
        d_sel = self.decode.select(req, workers)
        d = _view(d_sel, workers)
        d_id = d.worker_id
        if self.prefill is not None and self.pd is not None:
            choice = self.pd.decide(req, d, workers)
            if choice.disaggregate:
                p_sel = self.prefill.select(req, workers)
                p = _view(p_sel, workers)
                p_id = p.worker_id
                return Decision(p_id, d_id, p_id != d_id, req.cached_tokens(p_id, p.block_size),
                                d_sel.scores, p_sel.scores)
        return Decision(d_id, d_id, False, req.cached_tokens(d_id, d.block_size), d_sel.scores)


    def decode_for(self, request: RequestView, workers: Sequence[WorkerView]) -> str:
        """The decode pick alone, without a new P/D decision (a stateful picker advances once):
        the choice run re-picks with it once the prefill reported the experts the prompt
        activates. Raises `NoWorkerAvailable` like `decide`."""
        return self.decode.select(self.with_prefix(request), workers).worker_id


def _view(sel: Selection, workers: Sequence[WorkerView]) -> WorkerView:
    if sel.worker is not None:
        return sel.worker
    return next(w for w in workers if w.worker_id == sel.worker_id)
