"""Per-request records and per-worker counters the simulator produces (plain data)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

NAN = math.nan


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request; times are simulated seconds from the trace start.

    `itl` holds inter-token gaps as (seconds, count) runs: a decode chunk of m steps adds its
    first gap (which includes any stall since the previous token) and the mean of the others.
    `predicted_cached_tokens` is what the policy believed (prefix index); `cached_tokens` what
    the prefill worker's cache really held at admission.
    """

    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    prefill_worker: str = ""
    decode_worker: str = ""
    disaggregated: bool = False
    predicted_cached_tokens: int = 0
    cached_tokens: int = 0
    transfer_tokens: int = 0
    prefill_start_s: float = NAN
    first_token_s: float = NAN
    end_s: float = NAN
    dropped: str = ""  # reason, empty when served
    itl: list[tuple[float, int]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return not self.dropped and not math.isnan(self.end_s)

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def mean_itl_s(self) -> float:
        """Mean gap between output tokens (0 for a one-token answer)."""
        if self.output_tokens <= 1:
            return 0.0
        return (self.end_s - self.first_token_s) / (self.output_tokens - 1)


@dataclass(slots=True)
class WorkerStats:
    """Counters of one simulated worker."""

    busy_s: float = 0.0
    prefill_tokens: int = 0  # computed (uncached) prompt tokens
    decode_tokens: int = 0
    iterations: int = 0
    transfer_out_tokens: int = 0
