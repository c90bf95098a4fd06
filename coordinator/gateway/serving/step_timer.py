"""`StepTimer`: the decode stream's moving deadline, without a timer per token.

The first event must come within `first_s`, every next one within `gap_s` of the one before,
and none after `deadline` (all in the event loop's clock). `asyncio.timeout().reschedule()` per
event costs a timer-heap update each time; here the stream loop only records the time of each
event (`touch`; after the first event the due time only moves later), and the one timer, when
it fires, either re-arms for what is left or cancels the task. The cancellation surfaces as
`TimeoutError` from `async with`, exactly like `asyncio.timeout`; a cancellation from outside
(the client left) stays a `CancelledError`.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class StepTimer:
    __slots__ = ("_cancelling", "_expired", "_handle", "_loop", "_task", "deadline", "gap_s",
                 "last", "limit")

    def __init__(self, first_s: float, gap_s: float, deadline: float,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        """`loop`: the running loop, when the caller has it (looking it up costs a syscall)."""
        self._loop = loop or asyncio.get_running_loop()
        self.gap_s = gap_s
        self.deadline = deadline
        self.last = self._loop.time()
        self.limit = first_s  # allowed since `last`: first_s until the first event, then gap_s
        self._task: asyncio.Task[object] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._expired = False
        self._cancelling = 0

    def touch(self) -> None:
        """An event arrived: the next is due within `gap_s` of now."""
        self.last = self._loop.time()
        if self.limit != self.gap_s:  # the first event: the due time may move earlier, once
            self.limit = self.gap_s
            if self._handle is not None:
                self._handle.cancel()
                self._handle = self._loop.call_at(self._due(), self._fire)

    def _due(self) -> float:
        return min(self.last + self.limit, self.deadline)

    def _fire(self) -> None:
        due = self._due()
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._fire)
            return
        self._handle = None
        self._expired = True
        assert self._task is not None
        self._task.cancel()

    async def __aenter__(self) -> StepTimer:
        self._task = asyncio.current_task(self._loop)
        if self._task is None:
            raise RuntimeError("StepTimer must be used inside a task")
        self._cancelling = self._task.cancelling()
        self._handle = self._loop.call_at(self._due(), self._fire)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> bool:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._expired:
            assert self._task is not None
            # ours alone (nobody else cancelled the task meanwhile): a timeout
            if self._task.uncancel() <= self._cancelling and et is asyncio.CancelledError:
                raise TimeoutError from e
        return False
