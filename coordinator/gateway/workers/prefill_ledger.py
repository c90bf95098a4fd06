"""The gateway's own queued-prefill estimate for workers that export no queued-token gauge.

vLLM reports waiting and running request counts but not the prompt tokens still to prefill
(see `load.py`), so the pool counts what this replica dispatched: `start(worker, tokens)` when
a prompt is sent to be prefilled there (remote prefill, or a decode that prefills locally),
`done(handle)` when its prefill answer or first token comes back (or the request fails). A
handle nobody closes expires after `ttl_s`. Plain data; the clock is passed in.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable


class PrefillLedger:
    def __init__(self, ttl_s: float = 300.0, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self._ids = itertools.count(1)
        self._open: dict[int, tuple[str, int, float]] = {}  # handle -> (worker, tokens, t0)
        self._tokens: dict[str, int] = {}

    def start(self, worker_id: str, tokens: int) -> int:
        """Count `tokens` (>= 0) as queued on `worker_id`; returns the handle for `done`."""
        handle = next(self._ids)
        tokens = max(int(tokens), 0)
        self._open[handle] = (worker_id, tokens, self.clock())
        if tokens:
            self._tokens[worker_id] = self._tokens.get(worker_id, 0) + tokens
        return handle

    def done(self, handle: int) -> str | None:
        """Close `handle`; returns its worker, or None if already closed, expired or unknown."""
        entry = self._open.pop(handle, None)
        if entry is None:
            return None
        self._sub(entry[0], entry[1])
        return entry[0]

    def tokens(self, worker_id: str) -> int:
        return self._tokens.get(worker_id, 0)

    def drop_worker(self, worker_id: str) -> None:
        """Forget a worker that left (its open handles close silently)."""
        self._tokens.pop(worker_id, None)
        for h in [h for h, e in self._open.items() if e[0] == worker_id]:
            del self._open[h]

    def expire(self) -> set[str]:
        """Close handles older than `ttl_s`; returns the workers whose figure changed."""
        limit = self.clock() - self.ttl_s
        changed: set[str] = set()
        while self._open:
            handle, (worker, tokens, t0) = next(iter(self._open.items()))
            if t0 > limit:  # handles are opened in time order
                break
            del self._open[handle]
            self._sub(worker, tokens)
            changed.add(worker)
        return changed

    def _sub(self, worker_id: str, tokens: int) -> None:
        left = self._tokens.get(worker_id, 0) - tokens
        if left > 0:
            self._tokens[worker_id] = left
        else:
            self._tokens.pop(worker_id, None)

    def check_integrity(self) -> None:
        want: dict[str, int] = {}
        for worker, tokens, _ in self._open.values():
            if tokens:
                want[worker] = want.get(worker, 0) + tokens
        assert want == self._tokens, (want, self._tokens)
