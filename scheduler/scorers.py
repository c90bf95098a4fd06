"""Scorers: each maps candidate worker ids to a score in [0, 1], higher is better.

Scorers are pure functions of their inputs and their constructor parameters; the framework
clamps and weighs. Table-driven tests pin the exact formulas given in each docstring.
Each also gives `upper_bound(worker)` for workers the request caches nothing on (see `Scorer`);
worker views are treated as immutable, so per-view terms may be cached by identity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from meshd.scheduler.cost_model import CostModel
from meshd.scheduler.types import RequestView, WorkerView

_DEFAULT_COST = CostModel()
_NO_REQUEST = RequestView("", "", 0, ())  # empty prompt, nothing cached
_MAX_CACHED = 4096  # per-scorer identity caches restart past this many entries


class PrefixScorer:
    """Fraction of the prompt that needs no prefill on the worker:
    `min(cached_blocks[w] * block_size, prompt) / prompt` (0 for an empty prompt). With a
    client cache hint (`cache_hint_tokens`, shorter than the prompt) the fraction is of the
    hinted prefix: a worker holding all of it scores 1, as if it held the whole prompt — the
    rest is new text that no worker holds."""

    name = "prefix"

    def score(self, request: RequestView, workers: Sequence[WorkerView]) -> dict[str, float]:
        n = request.num_prompt_tokens
        cached = request.cached_blocks
        if n <= 0 or not cached:
            return {}
        hint = request.cache_hint_tokens
        if 0 < hint < n:
            n = hint
        out: dict[str, float] = {}
        for w in workers:
            blocks = cached.get(w.worker_id)
            if blocks:
                out[w.worker_id] = min(blocks * w.block_size, n) / n
        return out

    def upper_bound(self, worker: WorkerView) -> float:
        return 0.0  # no cached blocks: absent from `score`


class LoadScorer:
    """`1 - (a*min(waiting/max_waiting, 1) + b*min(running/max_running, 1) + c*kv_usage
    + d*q/(q + tokens_scale)) / (a + b + c + d)` with a, b, c, d = `waiting_weight`,
    `running_weight`, `kv_weight`, `tokens_weight` and q = `num_waiting_tokens`.

    The request counts saturate (a worker with `max_waiting` queued requests looks as loaded
    as one with ten times more, and a count ignores prompt length); the queued-token term does
    not: it grows strictly with the prefill work queued, reaching 1/2 at `tokens_scale` tokens.
    `tokens_weight=0` (default) is the count-only scorer, bit for bit.
    """

    name = "load"

    def __init__(self, max_waiting: int = 16, max_running: int = 128,
                 waiting_weight: float = 0.5, running_weight: float = 0.2,
                 kv_weight: float = 0.3, tokens_weight: float = 0.0,
                 tokens_scale: int = 8192) -> None:
        if max_waiting <= 0 or max_running <= 0 or tokens_scale <= 0:
            raise ValueError("load scorer: max_waiting, max_running, tokens_scale must be > 0")
        if min(waiting_weight, running_weight, kv_weight, tokens_weight) < 0:
            raise ValueError("load scorer: weights must be >= 0")
        norm = waiting_weight + running_weight + kv_weight + tokens_weight
        if norm <= 0:
            raise ValueError("load scorer: weights must sum to > 0")
        self._a = waiting_weight / norm / max_waiting
        self._b = running_weight / norm / max_running
        self._c = kv_weight / norm
        self._d = tokens_weight / norm
        self._max_waiting, self._max_running = max_waiting, max_running
        self._scale = float(tokens_scale)

    def score(self, request: RequestView, workers: Sequence[WorkerView]) -> dict[str, float]:
        mw, mr, c, d, qs = self._max_waiting, self._max_running, self._c, self._d, self._scale
        a, b = self._a, self._b
        out: dict[str, float] = {}
        for w in workers:
            nw, nr, q = w.num_waiting, w.num_running, w.num_waiting_tokens
            load = a * (nw if nw < mw else mw) + b * (nr if nr < mr else mr) + c * w.kv_usage
            if q > 0 and d:
                load += d * (q / (q + qs))
            out[w.worker_id] = 1.0 - load
        return out

    def upper_bound(self, worker: WorkerView) -> float:
        return self.score(_NO_REQUEST, [worker])[worker.worker_id]  # request-independent


# (TTFT ms before prefill tokens, prefill ms/token, ITL ms before context, decode ms/kctx,
#  context tokens already in the batch)
_SLOTerms = tuple[float, float, float, float, int]


class SLOScorer:
    """Headroom against latency targets from the worker's cost model (`WorkerView.cost`):
    `h(x, slo) = clamp(1 - x / slo)`; TTFT from uncached tokens and queue, ITL from batch and
    context (`kv_usage * kv_capacity_blocks * block_size + prompt`). The queue costs
    `prefill_ms_per_token * num_waiting_tokens` when the worker reports queued tokens, else
    `queue_ms_per_waiting * num_waiting`. `phase` picks which count:
    "prefill" (TTFT), "decode" (ITL) or "both" (the smaller headroom)."""

    name = "slo"

    def __init__(self, ttft_slo_ms: float = 1000.0, itl_slo_ms: float = 50.0,
                 phase: str = "both") -> None:
        if phase not in ("prefill", "decode", "both"):
            raise ValueError(f"slo scorer: phase must be prefill|decode|both, got {phase!r}")
        if ttft_slo_ms <= 0 or itl_slo_ms <= 0:
            raise ValueError("slo scorer: SLOs must be > 0")
        self.ttft_slo_ms, self.itl_slo_ms, self.phase = ttft_slo_ms, itl_slo_ms, phase
        self._models: dict[int, tuple[Mapping[str, float], CostModel]] = {}
        self._terms: dict[int, tuple[WorkerView, _SLOTerms]] = {}

    def _model(self, cost: Mapping[str, float]) -> CostModel:
        hit = self._models.get(id(cost))
        if hit is not None and hit[0] is cost:
            return hit[1]
        model = CostModel.from_params(cost)
        if len(self._models) > _MAX_CACHED:
            self._models.clear()
        self._models[id(cost)] = (cost, model)
        return model

    def _worker_terms(self, w: WorkerView) -> _SLOTerms:
        """The request-independent parts of `CostModel.ttft_ms` / `itl_ms` for `w`, as the
        same float operations (left to right), so the scores stay bit-identical."""
        m = self._model(w.cost) if w.cost else _DEFAULT_COST
        q = w.num_waiting_tokens
        queue = m.prefill_ms_per_token * q if q > 0 else m.queue_ms_per_waiting * w.num_waiting
        ttft = queue + m.prefill_fixed_ms
        itl, ctx = 0.0, 0
        if self.phase != "prefill":
            itl = m.decode_base_ms + m.decode_ms_per_seq * (w.num_running + 1)
            ctx = int(w.kv_usage * w.kv_capacity_blocks * w.block_size)
        terms = (ttft, m.prefill_ms_per_token, itl, m.decode_ms_per_kctx, ctx)
        if len(self._terms) > _MAX_CACHED:
            self._terms.clear()
        self._terms[id(w)] = (w, terms)
        return terms

    def score(self, request: RequestView, workers: Sequence[WorkerView]) -> dict[str, float]:
        out: dict[str, float] = {}
        n = request.num_prompt_tokens
        cached = request.cached_blocks
        ttft, itl = self.phase != "decode", self.phase != "prefill"
        inv_ttft, inv_itl = 1.0 / self.ttft_slo_ms, 1.0 / self.itl_slo_ms
        seen = self._terms.get
        for w in workers:
            hit = seen(id(w))
            t = hit[1] if hit is not None and hit[0] is w else self._worker_terms(w)
            h = 1.0
            if ttft:
                hit_tokens = cached.get(w.worker_id, 0) * w.block_size
                uncached = n - hit_tokens if hit_tokens < n else 0
                h = 1.0 - (t[0] + t[1] * uncached) * inv_ttft
            if itl:
                hd = 1.0 - (t[2] + t[3] * (t[4] + n) / 1000.0) * inv_itl
                h = hd if hd < h else h
            out[w.worker_id] = h if h > 0.0 else 0.0
        return out

    def upper_bound(self, worker: WorkerView) -> float:
        """The score at an empty prompt: TTFT and ITL only grow with the prompt when the cost
        model's per-token terms are >= 0 (else 1.0, the framework's clamp)."""
        m = self._model(worker.cost) if worker.cost else _DEFAULT_COST
        if not (m.prefill_ms_per_token >= 0.0 and m.decode_ms_per_kctx >= 0.0):
            return 1.0
        return self.score(_NO_REQUEST, [worker])[worker.worker_id]


class ExpertAffinityScorer:
    """Share of the prompt's routed expert tokens (`RequestView.experts`, from prefill) whose
    experts the worker hosts; 1.0 when the worker hosts all experts (empty set) or the request
    carries no expert statistics."""

    name = "expert"

    def score(self, request: RequestView, workers: Sequence[WorkerView]) -> dict[str, float]:
        experts = request.experts
        total = sum(experts.values())
        if total <= 0:
            return dict.fromkeys([w.worker_id for w in workers], 1.0)
        out: dict[str, float] = {}
        for w in workers:
            hosted = w.experts
            if not hosted:
                out[w.worker_id] = 1.0
            else:
                out[w.worker_id] = sum(n for e, n in experts.items() if e in hosted) / total
        return out

    def upper_bound(self, worker: WorkerView) -> float:
        return 1.0
