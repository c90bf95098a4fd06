"""Bounds on the KV blocks a prefill worker holds for decode peers, in all and per caller.

A `do_remote_decode` request ends with its prompt's blocks held under a lease until a decode
worker pulls them or the lease expires (`kv_transfer.leases`). Without a bound, a few such
requests nobody pulls hold the whole KV pool for the lease's lifetime and every other request
waits. `LeaseQuota` counts, per caller (the peer address) and in all, the blocks of requests
admitted and not yet answered (`pending`) and of leases granted and not yet ended (`held`); a
request that would take either count past its bound is refused: the embedded engine's handler
answers 429 (the gateway prefills elsewhere or on the decode worker); the vLLM connector, which
sees no caller (vLLM's API key admits only the mesh), bounds the total and frees the blocks at
once, answering without `kv_transfer_params` (the decode worker prefills itself).

Thread-safe: `admit`/`settle` run on the server's event loop, `end` on whichever thread ended
the lease (a transport thread or the engine's step thread).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class QuotaRefusal:
    scope: str  # "caller" | "total"
    used: int  # blocks pending + held in that scope
    bound: int
    need: int

    def message(self, caller: str) -> str:
        who = f"caller {caller}" if self.scope == "caller" else "all callers"
        return (f"This prefill worker holds {self.used} KV blocks for decode peers of {who} "
                f"(bound {self.bound}); this request needs {self.need} more. Retry once a "
                f"decode worker pulls its blocks or their leases expire.")


class LeaseQuota:
    def __init__(self, max_blocks: int, max_blocks_per_caller: int) -> None:
        if max_blocks < 1 or max_blocks_per_caller < 1:
            raise ValueError("lease bounds must be >= 1")
        self.max_blocks, self.max_per_caller = max_blocks, max_blocks_per_caller
        self._lock = threading.Lock()
        self._callers: dict[str, int] = {}  # caller -> blocks pending + held
        self._total = 0
        self._leases: dict[str, tuple[str, int]] = {}  # request id -> (caller, blocks held)
        self.refused = {"caller": 0, "total": 0}

    def admit(self, caller: str, need: int) -> QuotaRefusal | None:
        """Reserve `need` blocks for a request of `caller`, or say which bound it would pass.
        A request larger than a bound on its own is admitted when nothing else counts there
        (it would otherwise never run)."""
        with self._lock:
            mine = self._callers.get(caller, 0)
            if mine and mine + need > self.max_per_caller:
                self.refused["caller"] += 1
                return QuotaRefusal("caller", mine, self.max_per_caller, need)
            if self._total and self._total + need > self.max_blocks:
                self.refused["total"] += 1
                return QuotaRefusal("total", self._total, self.max_blocks, need)
            self._callers[caller] = mine + need
            self._total += need
            return None

    def settle(self, caller: str, reserved: int, request_id: str, held: int) -> None:
        """The request answered: its reservation becomes its lease's `held` blocks (0: no
        lease was granted). Call `end(request_id)` again if the lease may already have ended
        (it is idempotent)."""
        with self._lock:
            self._add(caller, held - reserved)
            if held:
                self._leases[request_id] = (caller, held)

    def end(self, request_id: str) -> None:
        """A lease ended (pulled, expired or released): its blocks stop counting. Idempotent;
        an id never settled is ignored."""
        with self._lock:
            entry = self._leases.pop(request_id, None)
            if entry is not None:
                self._add(entry[0], -entry[1])

    def _add(self, caller: str, delta: int) -> None:
        left = self._callers.get(caller, 0) + delta
        if left > 0:
            self._callers[caller] = left
        else:
            self._callers.pop(caller, None)
        self._total += delta

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {"max_blocks": self.max_blocks, "max_blocks_per_caller": self.max_per_caller,
                    "blocks": self._total, "leases": len(self._leases),
                    "callers": dict(self._callers), "refused": dict(self.refused)}
