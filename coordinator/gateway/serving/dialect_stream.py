"""Streaming a structured dialect's response (`dialect_shapes.DialectShape`): the head events
when the stream opens, each choice's events as its worker's deltas arrive (one write per read
burst), then the tail — after `before_tail` (the Responses memory stores the conversation
there, so a follow-up sent the moment the stream ends finds it)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from meshd.coordinator.gateway.http.responder import Responder
from meshd.coordinator.gateway.serving.choice import ChoiceRun
from meshd.coordinator.gateway.serving.dialect_shapes import DialectShape
from meshd.coordinator.gateway.serving.shapes import ChoiceOutput, Delta

Usage = Callable[[int, Sequence[ChoiceOutput], Sequence[ChoiceRun]], dict[str, Any]]
Sign = Callable[[Sequence[ChoiceOutput]], dict[str, Any] | None]
RunAll = Callable[[list[Coroutine[Any, Any, ChoiceOutput]]], Awaitable[list[ChoiceOutput]]]


async def stream_dialect(runs: list[ChoiceRun], shape: DialectShape, responder: Responder,
                         timing: Any, prompt_tokens: int, headers: bytes, sign: Sign | None,
                         usage: Usage, run_all: RunAll,
                         before_tail: Callable[[], Awaitable[None]] | None = None) -> None:
    responder.named = not shape.done

    async def start() -> None:
        await responder.start_stream(headers=headers)
        await responder.send_sse(shape.head(prompt_tokens))

    def emitter(i: int) -> Callable[[list[Delta]], Coroutine[Any, Any, None]]:
        async def emit(deltas: list[Delta]) -> None:
            timing.burst(deltas)
            if not responder.started:
                await start()
            events: list[bytes] = []
            for d in deltas:
                events += shape.events(i, d)
            await responder.send_sse(events)
        return emit

    outputs = await run_all([r.run(emitter(i)) for i, r in enumerate(runs)])
    if not responder.started:
        await start()
    signed = sign(outputs) if sign is not None else None
    tail = shape.tail(outputs, usage(prompt_tokens, outputs, runs),
                      None if signed is None else {"receipt": signed})
    if before_tail is not None:
        await before_tail()
    await responder.send_sse(tail)
    await responder.end_stream(done=shape.done)
