"""The request lifecycle as an explicit state machine, with a deadline on every step.

    admitted ──▶ prefill ──▶ transfer ──▶ decode ──▶ done
        │           │           │           │
        └───────────┴───────────┴───────────┴──────▶ failed

`prefill` is the remote prefill on a prefill worker (`max_tokens=1`, `do_remote_decode`);
`transfer` is the decode worker pulling the KV blocks (it happens inside the decode worker before
its first token, so the gateway sees it as the wait for the first decode token); `decode` streams
tokens. A colocated request goes admitted → decode. Recovery re-enters a phase: prefill on another
worker, or decode on another worker with the prompt plus the tokens already streamed.

Plain data with a passed-in clock: the choice run (`serving/choice.py`) performs the I/O and
calls `advance`/`fail`; `serving/failures.py` says what to do after a failure.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from meshd.coordinator.gateway.config import Deadlines


class Phase(enum.Enum):
    ADMITTED = "admitted"
    PREFILL = "prefill"
    TRANSFER = "transfer"
    DECODE = "decode"
    DONE = "done"
    FAILED = "failed"


_NEXT: dict[Phase, frozenset[Phase]] = {
    Phase.ADMITTED: frozenset({Phase.PREFILL, Phase.DECODE, Phase.FAILED}),
    Phase.PREFILL: frozenset({Phase.PREFILL, Phase.TRANSFER, Phase.DECODE, Phase.FAILED}),
    Phase.TRANSFER: frozenset({Phase.DECODE, Phase.FAILED}),
    Phase.DECODE: frozenset({Phase.DECODE, Phase.DONE, Phase.FAILED}),
    Phase.DONE: frozenset(),
    Phase.FAILED: frozenset(),
}


class Failure(enum.Enum):
    """Why a step failed, as the driver observed it."""

    CONNECT = "connect"  # worker unreachable / connection reset before any answer
    TIMEOUT = "timeout"  # the step's deadline passed
    WORKER_ERROR = "worker_error"  # 5xx or a broken stream from the worker
    BAD_REQUEST = "bad_request"  # the worker rejected the request (4xx): not retryable
    BUSY = "busy"  # the worker is healthy but refused this request for now (429): try another
    NO_WORKER = "no_worker"  # nothing to route to
    DEADLINE = "deadline"  # the request's overall deadline passed
    CANCELLED = "cancelled"  # the client went away


class Action(enum.Enum):
    RETRY_PREFILL = "retry_prefill"  # prefill on another prefill worker
    LOCAL_PREFILL = "local_prefill"  # skip remote prefill: the decode worker prefills itself
    CONTINUE_DECODE = "continue_decode"  # decode elsewhere: prompt + tokens so far
    GIVE_UP = "give_up"


class InvalidTransition(Exception):
    pass


@dataclass(slots=True)
class Lifecycle:
    request_id: str
    started_at: float
    deadlines: Deadlines = field(default_factory=Deadlines)
    phase: Phase = Phase.ADMITTED
    history: list[tuple[Phase, float, str]] = field(default_factory=list)
    prefill_attempts: int = 0
    decode_attempts: int = 0
    failures: list[tuple[Phase, Failure, str]] = field(default_factory=list)
    outcome: str = ""

    def __post_init__(self) -> None:
        self.history.append((Phase.ADMITTED, self.started_at, ""))

    @property
    def deadline(self) -> float:
        return self.started_at + self.deadlines.total_s

    def remaining(self, now: float) -> float:
        return max(0.0, self.deadline - now)

    def step_timeout(self, now: float, step_s: float) -> float:
        """A step's timeout: its own limit, never past the request's deadline."""
        return min(step_s, self.remaining(now))

    def advance(self, to: Phase, now: float, note: str = "") -> None:
        if to not in _NEXT[self.phase]:
            raise InvalidTransition(f"{self.request_id}: {self.phase.value} -> {to.value}")
        if to is Phase.PREFILL:
            self.prefill_attempts += 1
        elif to is Phase.DECODE and self.phase is not Phase.DECODE:
            self.decode_attempts += 1
        self.phase = to
        self.history.append((to, now, note))
        if to is Phase.DONE:
            self.outcome = "ok"

    def redecode(self, now: float, note: str) -> None:
        """Enter decode again on another worker (continuation)."""
        self.decode_attempts += 1
        self.history.append((Phase.DECODE, now, note))

    def fail(self, failure: Failure, detail: str = "") -> None:
        """Record a failed step; the phase stays until `recovery` is acted on or `finish_failed`."""
        self.failures.append((self.phase, failure, detail))

    def finish_failed(self, now: float, outcome: str) -> None:
        self.advance(Phase.FAILED, now, outcome)
        self.outcome = outcome
