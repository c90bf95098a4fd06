"""StepTimer: the moving stream deadline (first event, gaps, the request's deadline)."""

import asyncio

import pytest

from meshd.coordinator.gateway.serving.step_timer import StepTimer


async def run(first: float, gap: float, total: float, gaps: list[float]) -> list[int]:
    loop = asyncio.get_running_loop()
    seen: list[int] = []
    async with StepTimer(first, gap, loop.time() + total) as t:
        for i, g in enumerate(gaps):
            await asyncio.sleep(g)
            seen.append(i)
            t.touch()
    return seen


@pytest.mark.parametrize(("first", "gap", "total", "gaps", "times_out"), [
    (0.2, 0.05, 5.0, [0.1, 0.02, 0.02, 0.02], False),  # slow first, quick gaps
    (0.05, 0.2, 5.0, [0.1], True),  # the first event is late
    (0.2, 0.05, 5.0, [0.01, 0.02, 0.1], True),  # a gap is too long
    (0.2, 0.1, 0.15, [0.05, 0.05, 0.05, 0.05], True),  # every step in time, the total not
])
async def test_step_timer(first: float, gap: float, total: float, gaps: list[float],
                          times_out: bool) -> None:
    if times_out:
        with pytest.raises(TimeoutError):
            await run(first, gap, total, gaps)
    else:
        assert await run(first, gap, total, gaps) == list(range(len(gaps)))


async def test_outside_cancellation_stays_a_cancellation() -> None:
    task = asyncio.ensure_future(run(5.0, 5.0, 10.0, [1.0]))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_many_events_arm_no_timer_each() -> None:
    loop = asyncio.get_running_loop()
    async with StepTimer(1.0, 1.0, loop.time() + 10) as t:
        before = len(loop._scheduled)  # type: ignore[attr-defined]
        for _ in range(1000):
            t.touch()
        assert len(loop._scheduled) == before  # type: ignore[attr-defined]
