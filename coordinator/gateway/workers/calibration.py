"""Online calibration of the SLO scorer's cost parameters from a worker's `/metrics`.

Two parameters are measured, per worker, from vLLM's histograms between two scrapes (the
embedded engine exports the same names):

* `prefill_ms_per_token` = (Δ `vllm:request_prefill_time_seconds_sum` - `prefill_fixed_ms` x
  Δ count) / (Δ `vllm:request_prompt_tokens_sum` - Δ `vllm:prefix_cache_hits`): prefill time
  per computed prompt token. A window where the cached part is not clearly below the prompt
  tokens (hits are counted at scheduling, prompts at the end) is skipped;
* `decode_base_ms` = mean inter-token gap (Δ `vllm:inter_token_latency_seconds` sum / count)
  minus the model's batch and context terms at the scraped load (`decode_ms_per_seq` x running
  + `decode_ms_per_kctx` x context / 1000), floored at 0.

Each is an exponentially weighted mean over windows (`alpha`). Measured under batching, both
include time shared with other requests in the step: they describe the worker as it runs, not
its roofline. Decode workers that import their KV see little prefill (their figure is diluted
and only the prefill profile reads it). The other parameters stay as configured. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshd.coordinator.gateway.workers.load import WorkerLoad
from meshd.scheduler.cost_model import CostModel

CALIBRATED = ("prefill_ms_per_token", "decode_base_ms")


@dataclass(slots=True)
class Calibration:
    """One worker's measured parameters. `observe` each scrape; `published` changes only when
    a value moves by more than `tolerance` (relative), so views stay the same objects."""

    alpha: float = 0.3
    tolerance: float = 0.1
    min_itl_samples: int = 4
    measured: dict[str, float] = field(default_factory=dict)
    published: dict[str, float] = field(default_factory=dict)
    _prev: WorkerLoad | None = None

    def observe(self, load: WorkerLoad, base: CostModel, context_tokens: int) -> bool:
        """Take one scrape; True when `published` changed."""
        prev, self._prev = self._prev, load
        if prev is None:
            return False
        for key, value in window(prev, load, base, context_tokens, self.min_itl_samples).items():
            old = self.measured.get(key)
            self.measured[key] = value if old is None else old + self.alpha * (value - old)
        changed = False
        for key, value in self.measured.items():
            pub = self.published.get(key)
            if pub is None or abs(value - pub) > self.tolerance * max(abs(pub), 1e-9):
                self.published[key] = value
                changed = True
        return changed


def window(prev: WorkerLoad, cur: WorkerLoad, base: CostModel, context_tokens: int,
           min_itl_samples: int = 4) -> dict[str, float]:
    """The parameters one scrape window measures (absent: not enough data, or a restart)."""
    out: dict[str, float] = {}
    n = cur.prefill_count - prev.prefill_count
    prompt = cur.request_prompt_tokens_sum - prev.request_prompt_tokens_sum
    computed = prompt - (cur.prefix_hits - prev.prefix_hits)
    if n >= 1 and prompt > 0 and computed >= 0.1 * prompt:
        ms = 1e3 * (cur.prefill_s_sum - prev.prefill_s_sum) - base.prefill_fixed_ms * n
        out["prefill_ms_per_token"] = max(ms, 0.0) / computed
    gaps = cur.itl_count - prev.itl_count
    if gaps >= min_itl_samples:
        mean_ms = 1e3 * (cur.itl_s_sum - prev.itl_s_sum) / gaps
        batch_ms = (base.decode_ms_per_seq * max(cur.num_running, 1)
                    + base.decode_ms_per_kctx * context_tokens / 1000.0)
        out["decode_base_ms"] = max(mean_ms - batch_ms, 0.0)
    return out
