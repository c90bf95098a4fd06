"""The gateway's request record and the store's retention policy: the typed contract between
the gateway (which builds one record per finished request) and `store.RecordStore`."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One finished request, as the gateway saw it."""
    request_id: str
    trace_id: str            # W3C trace id, 32 hex
    started_at: float        # unix seconds (wall clock)
    tenant: str              # "" when none
    model: str
    endpoint: str            # "chat" | "completions"
    outcome: str             # "ok" | "error" | "timeout" | "cancelled" | "refused"
    status: int              # HTTP status sent (0: the client left first)
    mode: str                # "disaggregated" | "local" | "passthrough" | "mixed" | ""
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float | None     # None: no token was sent
    e2e_s: float
    prefill_workers: str     # comma-separated worker ids ("" none)
    decode_workers: str      # comma-separated, in order (continuations)
    nodes: str               # comma-separated node ids involved
    retries: int             # prefill retries + continuations
    choices: int


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long the store keeps what (config section `gateway.records`)."""
    raw_days: float = 7.0          # raw records kept this long, then only their hourly rollups
    rollup_days: float = 90.0      # hourly rollups kept this long (>= raw_days)
    max_raw_rows: int = 1_000_000  # bound on raw rows: the oldest go first (still rolled up)
    max_buffer: int = 100_000      # records waiting for the next flush; past it the oldest drop

    def __post_init__(self) -> None:
        for name in ("raw_days", "rollup_days"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < math.inf:
                raise ValueError(f"gateway.records.{name}: must be a number > 0, got {v!r}")
        if self.rollup_days < self.raw_days:
            raise ValueError(f"gateway.records.rollup_days: must be >= raw_days "
                             f"({self.raw_days}), got {self.rollup_days!r}")
        for name in ("max_raw_rows", "max_buffer"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"gateway.records.{name}: must be an integer >= 1, got {v!r}")
