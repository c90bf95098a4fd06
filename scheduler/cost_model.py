"""Per-worker latency cost model for the SLO scorer (H100-ish defaults for an 8B dense model).

Parameters come from `WorkerView.cost` (keys below); missing keys take the defaults. Figures are
milliseconds. Prefill time is linear in uncached prompt tokens; one decode step costs a base,
a per-sequence term and a per-context-token term (attention reads the batch's KV).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CostModel:
    prefill_fixed_ms: float = 4.0
    prefill_ms_per_token: float = 0.06  # ~16k prompt tokens/s
    queue_ms_per_waiting: float = 60.0  # expected delay each waiting request adds to TTFT
    decode_base_ms: float = 7.0
    decode_ms_per_seq: float = 0.04
    decode_ms_per_kctx: float = 0.015  # per 1,000 context tokens in the running batch

    @staticmethod
    def from_params(params: Mapping[str, float]) -> CostModel:
        """Defaults overridden by `params`; an unknown key raises `ValueError` naming it."""
        if not params:
            return _DEFAULT
        unknown = set(params) - set(CostModel.__dataclass_fields__)
        if unknown:
            raise ValueError(f"cost model: unknown parameters {sorted(unknown)}")
        return CostModel(**{k: float(v) for k, v in params.items()})

    def ttft_ms(self, uncached_tokens: int, num_waiting: int) -> float:
        return (self.queue_ms_per_waiting * num_waiting + self.prefill_fixed_ms
                + self.prefill_ms_per_token * uncached_tokens)

    def itl_ms(self, batch: int, context_tokens: int) -> float:
        return (self.decode_base_ms + self.decode_ms_per_seq * batch
                + self.decode_ms_per_kctx * context_tokens / 1000.0)


_DEFAULT = CostModel()
