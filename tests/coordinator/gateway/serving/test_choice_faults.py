"""The choice run's failure logic, table-driven against a scripted `WorkerSource`.

Each row: the workers (id -> role), a fault script per worker (what its successive calls do),
and the expected lifecycle history, counters, text and error. Workers "generate" the same
sequence (token k at output position k), so a continuation anywhere must give the same text
with no gap and no duplicate. Runs in milliseconds; the real-process fault tests are
tests/coordinator/mesh/test_mesh_faults.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
import pytest
from nacl.signing import SigningKey

from meshd import receipts
from meshd.coordinator.gateway.config import Deadlines
from meshd.coordinator.gateway.http.errors import ApiError
from meshd.coordinator.gateway.serving.choice import ChoiceRun, ChoiceSpec, Counters
from meshd.coordinator.gateway.serving.mesh import run_all
from meshd.coordinator.gateway.serving.receipts import Provenance, ReceiptSigner, Segment
from meshd.coordinator.gateway.serving.shapes import Delta
from meshd.coordinator.gateway.tracing.context import TraceContext, parse_traceparent
from meshd.coordinator.gateway.workers.client import (
    BackendConnectError,
    BackendHTTPError,
    BackendProtocolError,
    BackendTimeout,
)
from meshd.scheduler.pd import PDConfig, PDDecider
from meshd.scheduler.prefix_index import PrefixIndex
from meshd.scheduler.profiles import builtin
from meshd.scheduler.router import Router
from meshd.scheduler.types import RequestView, Role, WorkerView

PROMPT = tuple(range(100, 164))  # 64 tokens: four full blocks, worth disaggregating
MAX_TOKENS = 12
FAST = Deadlines(total_s=2.0, prefill_s=0.2, first_token_s=0.2, inter_token_s=0.1)


def text_of(ids: Sequence[int]) -> str:
    return "".join(chr(ord("a") + i % 26) for i in ids)


EXPECTED = text_of(range(MAX_TOKENS))
BAD = b'{"error": {"message": "seed out of range", "type": "invalid_request_error", ' \
      b'"param": "seed", "code": null}}'


@dataclass
class ScriptedSource:
    """Workers whose calls follow a script: per worker, one step per call (the last repeats).

    prefill steps: "ok" | "connect" | "reject" | "stall". stream steps: "ok" | "connect" |
    "reject" | ("die", k) | ("stall", k) | ("error_event", k) | ("short", k): k tokens first."""

    roles: dict[str, Role]
    script: dict[str, list[Any]]
    burst: bool = False  # every event in one read burst (a fast worker), else one by one
    calls: list[tuple[str, str]] = field(default_factory=list)
    failed: set[str] = field(default_factory=set)
    open_streams: int = 0
    keys: dict[str, SigningKey] = field(default_factory=dict)  # workers that attest (receipts)
    asked_to_attest: list[str] = field(default_factory=list)
    traceparents: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, worker, tp)

    def views(self) -> Sequence[WorkerView]:
        return [WorkerView(w, r, "m", healthy=w not in self.failed)
                for w, r in sorted(self.roles.items())]

    def mark_failed(self, worker_id: str) -> None:
        self.failed.add(worker_id)

    def _step(self, worker_id: str, kind: str) -> Any:
        self.calls.append((kind, worker_id))
        steps = self.script.get(worker_id, ["ok"])
        n = sum(1 for k, w in self.calls if w == worker_id)
        return steps[min(n, len(steps)) - 1]

    async def prefill(self, worker_id: str, body: dict[str, Any], request_id: str,
                      timeout_s: float, queued_tokens: int = 0, traceparent: str = "") -> Any:
        step = self._step(worker_id, "prefill")
        self.traceparents.append(("prefill", worker_id, traceparent))
        assert body["max_tokens"] == 1 and body["kv_transfer_params"]["do_remote_decode"]
        if step == "connect":
            raise BackendConnectError("refused", worker_id)
        if step == "reject":
            raise BackendHTTPError(400, BAD, worker_id)
        if step == "busy":  # a prefill worker at its KV lease bound
            raise BackendHTTPError(429, b'{"error": {"code": "kv_leases_exhausted"}}',
                                   worker_id)
        if step == "stall":  # what the pool does when the answer does not come in time
            await asyncio.sleep(timeout_s)
            raise BackendTimeout(f"no data within {timeout_s:g}s", worker_id)
        return {"kv_transfer_params": {"remote_engine_id": worker_id, "remote_block_ids": [1]}}

    @contextlib.asynccontextmanager
    async def stream(self, worker_id: str, body: dict[str, Any], request_id: str,
                     timeout_s: float, queued_tokens: int = 0, traceparent: str = ""
                     ) -> AsyncIterator[OneByOne]:
        step = self._step(worker_id, "stream")
        self.traceparents.append(("decode", worker_id, traceparent))
        if step == "connect":
            raise BackendConnectError("refused", worker_id)
        if step == "reject":
            raise BackendHTTPError(400, BAD, worker_id)
        done = len(body["prompt"]) - len(PROMPT)  # tokens the client already has
        assert list(body["prompt"][len(PROMPT):]) == list(range(done))
        assert body["max_tokens"] == MAX_TOKENS - done
        self.open_streams += 1
        if body.get("meshd_attest"):
            self.asked_to_attest.append(worker_id)
        try:
            events = self._events(worker_id, step, done, body)
            yield AllAtOnce(events) if self.burst else OneByOne(events)
        finally:
            self.open_streams -= 1

    async def _events(self, worker_id: str, step: Any, done: int,
                      body: dict[str, Any]) -> AsyncIterator[bytes]:
        kind, k = (step, MAX_TOKENS) if step == "ok" else step
        for i in range(done, MAX_TOKENS):
            if i - done == k:
                if kind == "die":
                    raise BackendProtocolError("worker closed mid-response", worker_id)
                if kind == "stall":
                    await asyncio.sleep(10)
                if kind == "error_event":
                    yield b'{"error": {"message": "engine dead"}}'
                if kind == "short":
                    return
            finish = "length" if i == MAX_TOKENS - 1 else None
            yield orjson.dumps({"choices": [{"index": 0, "text": text_of([i]),
                                             "token_ids": [i], "finish_reason": finish}]})
            await asyncio.sleep(0)
        key = self.keys.get(worker_id)
        if key is not None and body.get("meshd_attest"):  # as the engine does, after the end
            att = receipts.attest(key, model="m", request_id="r1-d", choice=0,
                                  prompt_ids=body["prompt"],
                                  output_ids=list(range(done, MAX_TOKENS)),
                                  finish_reason="length")
            yield orjson.dumps({"choices": [], "meshd": {"attestations": [att]}})


class OneByOne:
    """`EventBatches` over an async iterator: one event per batch (a slow worker)."""

    def __init__(self, events: AsyncIterator[bytes]) -> None:
        self.events = events

    async def next_batch(self) -> list[bytes]:
        try:
            return [await anext(self.events)]
        except StopAsyncIteration:
            return []


class AllAtOnce:
    """`EventBatches` with every event in one burst (a worker that sent them all together);
    a failure after some events comes with the next batch, as a socket error would."""

    def __init__(self, events: AsyncIterator[bytes]) -> None:
        self.events, self.done = events, False

    async def next_batch(self) -> list[bytes]:
        if self.done:
            return []
        out = [e async for e in self.events]
        self.done = True
        return out


def make_router() -> Router:
    return Router(decode=builtin("decode"), prefill=builtin("prefill"),
                  pd=PDDecider(PDConfig(min_uncached_tokens=0)), index=PrefixIndex())


def make_run(source: ScriptedSource, deadlines: Deadlines = FAST, index: int = 0,
             counters: Counters | None = None, provenance: Provenance | None = None,
             trace: TraceContext | None = None) -> ChoiceRun:
    view = RequestView("r1", "m", len(PROMPT), (), max_tokens=MAX_TOKENS)
    spec = ChoiceSpec("r1", index, view, PROMPT, {"model": "m"}, MAX_TOKENS, (), text_of,
                      provenance=provenance, trace=trace)
    return ChoiceRun(spec, source, make_router(), deadlines, counters or Counters(),
                     time.monotonic)


P, D, B = Role.PREFILL, Role.DECODE, Role.BOTH
A, PF, TR, DE, DN, FL = "admitted", "prefill", "transfer", "decode", "done", "failed"


@dataclass(frozen=True)
class Row:
    name: str
    roles: dict[str, Role]
    script: dict[str, list[Any]]
    history: list[tuple[str, str]]  # (phase, note) after admitted; "" note: not checked
    counters: dict[str, int]
    error: int | None = None  # expected status, else EXPECTED text

    def __str__(self) -> str:
        return self.name


ROWS = [
    Row("colocated", {"b0": B}, {}, [(DE, "b0"), (DN, "")], {"local_prefill": 1}),
    Row("disaggregated", {"p0": P, "d0": D}, {},
        [(PF, "p0"), (TR, "d0"), (DE, "first token"), (DN, "")], {"disaggregated": 1}),
    Row("prefill refused, retried on another prefill worker",
        {"p0": P, "p1": P, "d0": D}, {"p0": ["connect"]},
        [(PF, "p0"), (PF, "p1"), (TR, "d0"), (DE, "first token"), (DN, "")],
        {"disaggregated": 1, "prefill_retries": 1}),
    Row("prefill stalls on the only prefill worker: decode prefills locally",
        {"p0": P, "d0": D}, {"p0": ["stall"]},
        [(PF, "p0"), (DE, "d0"), (DN, "")], {"prefill_fallbacks": 1, "prefill_retries": 1}),
    Row("prefill busy (429, lease bound): another prefill worker, the busy one stays healthy",
        {"p0": P, "p1": P, "d0": D}, {"p0": ["busy"]},
        [(PF, "p0"), (PF, "p1"), (TR, "d0"), (DE, "first token"), (DN, "")],
        {"disaggregated": 1, "prefill_retries": 1}),
    Row("the only prefill worker busy: decode prefills locally", {"p0": P, "d0": D},
        {"p0": ["busy"]}, [(PF, "p0"), (DE, "d0"), (DN, "")],
        {"prefill_fallbacks": 1, "prefill_retries": 1}),
    Row("prefill rejected (4xx): the worker's error, no retry", {"p0": P, "d0": D},
        {"p0": ["reject"]}, [(PF, "p0"), (FL, "bad_request")], {}, error=400),
    Row("decode dies mid-stream: continued on the other decode worker",
        {"p0": P, "d0": D, "d1": D}, {"d0": [("die", 5)]},
        [(PF, "p0"), (TR, "d0"), (DE, "first token"), (DE, "d1"), (DN, "")],
        {"disaggregated": 1, "continuations": 1}),
    Row("decode dies mid-stream, only the prefill worker left: continued there",
        {"p0": P, "d0": D}, {"d0": [("die", 5)]},
        [(PF, "p0"), (TR, "d0"), (DE, "first token"), (DE, "p0"), (DN, "")],
        {"disaggregated": 1, "continuations": 1}),
    Row("decode stalls past inter_token_s: continued elsewhere", {"d0": D, "d1": D},
        {"d0": [("stall", 3)]}, [(DE, "d0"), (DE, "d1"), (DN, "")],
        {"local_prefill": 1, "continuations": 1}),
    Row("error event mid-stream: continued elsewhere", {"b0": B, "b1": B},
        {"b0": [("error_event", 4)]}, [(DE, "b0"), (DE, "b1"), (DN, "")],
        {"local_prefill": 1, "continuations": 1}),
    Row("transfer fails before the first token: another worker prefills itself",
        {"p0": P, "d0": D, "d1": D}, {"d0": ["connect"]},
        [(PF, "p0"), (TR, "d0"), (DE, "transfer failed"), (DE, "d1"), (DN, "")],
        {"disaggregated": 1, "continuations": 1}),
    Row("every worker dies: 503 after max_decode_attempts", {"b0": B, "b1": B, "b2": B},
        {w: [("die", 1)] for w in ("b0", "b1", "b2")},
        [(DE, "b0"), (DE, "b1"), (DE, "b2"), (FL, "worker_failed")],
        {"local_prefill": 1, "continuations": 2}, error=503),
    Row("the only worker dies mid-stream: 503 worker_failed, not 'no worker'", {"b0": B},
        {"b0": [("die", 3)]}, [(DE, "b0"), (FL, "worker_failed")], {"local_prefill": 1},
        error=503),
    Row("stream ends early without a finish: 503", {"b0": B}, {"b0": [("short", 4)]},
        [(DE, "b0"), (FL, "worker_failed")], {"local_prefill": 1}, error=503),
    Row("decode rejected (4xx): the worker's error", {"b0": B, "b1": B}, {"b0": ["reject"]},
        [(DE, "b0"), (FL, "bad_request")], {"local_prefill": 1}, error=400),
]


@pytest.mark.parametrize("row", ROWS, ids=str)
async def test_fault_table(row: Row) -> None:
    source = ScriptedSource(row.roles, row.script)
    counters = Counters()
    run = make_run(source, counters=counters)
    got: list[Delta] = []

    async def emit(deltas: list[Delta]) -> None:
        got.extend(deltas)

    if row.error is None:
        out = await run.run(emit)
        assert "".join(out.text) == EXPECTED and out.token_ids == list(range(MAX_TOKENS))
        assert "".join(d.text for d in got) == EXPECTED
        assert out.finish_reason == "length"
    else:
        with pytest.raises(ApiError) as info:
            await run.run(emit)
        assert info.value.status == row.error
        if row.error == 400:
            assert info.value.message == "seed out of range" and info.value.param == "seed"
        if row.error == 503:
            assert info.value.code == "worker_failed", info.value.message
    history = [(ph.value, note) for ph, _, note in run.lc.history[1:]]
    assert len(history) == len(row.history), history
    for (ph, note), (want_ph, want_note) in zip(history, row.history, strict=True):
        assert ph == want_ph and (not want_note or note == want_note), history
    assert {k: v for k, v in vars(counters).items() if v} == row.counters
    assert source.open_streams == 0
    if "busy" in row.name:
        assert source.failed == set()  # busy is not failed: the next request may use it


async def test_request_deadline_is_a_504_and_never_overrun() -> None:
    source = ScriptedSource({"b0": B, "b1": B}, {"b0": [("stall", 2)], "b1": [("stall", 2)]})
    dl = replace(FAST, total_s=0.3, inter_token_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(ApiError) as info:
        await make_run(source, dl).run(lambda d: asyncio.sleep(0))
    assert info.value.status == 504 and info.value.code == "timeout"
    assert time.monotonic() - t0 < 0.3 + 0.15
    assert source.open_streams == 0


async def test_a_failed_choice_ends_its_siblings_on_every_worker() -> None:
    """n choices; one is rejected: the others' worker streams are all closed before the
    error is raised (nothing keeps generating for a request that already failed)."""
    n = 8
    roles = {"b0": B, "b1": B}
    source = ScriptedSource(roles, {"b0": [("stall", 2)] * 2 * n, "b1": [("stall", 2)] * 2 * n})
    slow = replace(FAST, inter_token_s=5.0, first_token_s=5.0)
    counters = Counters()
    runs = [make_run(source, slow, i, counters) for i in range(n)]

    async def ignore(d: list[Delta]) -> None:
        return None

    async def fail_after_siblings_started() -> Any:
        while source.open_streams < n - 1:
            await asyncio.sleep(0.005)
        raise ApiError(400, "choice 7 rejected")

    coros = [r.run(ignore) for r in runs[:-1]] + [fail_after_siblings_started()]
    t0 = time.monotonic()
    with pytest.raises(ApiError, match="choice 7 rejected"):
        await run_all(coros)
    assert time.monotonic() - t0 < 1.0
    assert source.open_streams == 0


async def test_cancelling_the_request_ends_every_choice() -> None:
    source = ScriptedSource({"b0": B}, {"b0": [("stall", 1)] * 8})
    slow = replace(FAST, inter_token_s=5.0)
    runs = [make_run(source, slow, i) for i in range(4)]
    task = asyncio.ensure_future(run_all([r.run(lambda d: asyncio.sleep(0)) for r in runs]))
    while source.open_streams < 4:
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert source.open_streams == 0


async def test_choices_failing_together_leave_no_unretrieved_error() -> None:
    """Several choices failing in the same tick (one deadline for all): one error is raised,
    the others are retrieved too (an unretrieved task exception is logged from a finalizer,
    which on CPython 3.11.7 also corrupts the compiler's recursion accounting)."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))

    async def fail(i: int) -> None:
        await asyncio.sleep(0.01)
        raise ApiError(504, f"deadline {i}")

    with pytest.raises(ApiError, match="deadline 0"):
        await run_all([fail(i) for i in range(8)])
    import gc

    gc.collect()
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    # (only this test's: the collection may also finalize an earlier test's leftovers, such
    # as an SDK client's task whose loop has closed)
    assert not [c for c in seen if isinstance(c.get("exception"), ApiError)], seen


@pytest.mark.parametrize("fault", [("error_event", 4), ("die", 6)])
async def test_a_burst_that_ends_in_a_failure_forwards_what_came_before(fault: Any) -> None:
    """The events a worker sent before failing, in the same read burst, reach the client:
    the continuation starts after them (no gap, no duplicate)."""
    source = ScriptedSource({"b0": B, "b1": B}, {"b0": [fault]}, burst=True)
    counters = Counters()
    got: list[Delta] = []

    async def emit(deltas: list[Delta]) -> None:
        got.extend(deltas)

    out = await make_run(source, counters=counters).run(emit)
    assert "".join(d.text for d in got) == EXPECTED == "".join(out.text)
    assert counters.continuations == 1


async def test_a_receipt_names_each_segment_of_a_continued_choice() -> None:
    """Receipts (issue 12 §2): P's node, then one segment per decode stream from the token it
    started at; only workers that can attest are asked to; a segment cut off by its worker's
    death is unattested (so the receipt verifies only when that is allowed), the one that
    finished is attested, and the whole verifies against the nodes' and the gateway's keys."""
    node_key = {w: SigningKey(bytes([i + 1]) * 32) for i, w in enumerate(("p0", "d0", "d1"))}
    nodes = {w: receipts.node_id_for(bytes(k.verify_key)) for w, k in node_key.items()}
    source = ScriptedSource({"p0": P, "d0": D, "d1": D}, {"d0": [("die", 5)]},
                            keys={"d0": node_key["d0"], "d1": node_key["d1"]})
    run = make_run(source, provenance=lambda w: (nodes[w], w != "p0"))

    async def emit(deltas: list[Delta]) -> None:
        pass

    out = await run.run(emit)
    assert out.token_ids == list(range(MAX_TOKENS))
    assert run.prefilled_on == ("p0", nodes["p0"])
    assert [(s.worker_id, s.node_id, s.start) for s in run.segments] == [
        ("d0", nodes["d0"], 0), ("d1", nodes["d1"], 5)]
    assert source.asked_to_attest == ["d0", "d1"]
    assert run.segments[0].attestation is None  # d0 died before its end
    assert isinstance(run.segments[1].attestation, dict)

    gateway = SigningKey(bytes([9]) * 32)
    signer = ReceiptSigner(gateway)
    receipt = signer.build(request_id="r1", response_id="cmpl-r1", model="m", tenant="t",
                           created_ms=receipts.now_ms(), prompt_ids=PROMPT, runs=[run],
                           outputs=[out])
    assert receipt is not None and signer.issued == 1
    (choice,) = receipt["choices"]
    assert [(s["start"], s["tokens"]) for s in choice["segments"]] == [(0, 5), (5, 7)]
    assert choice["prefill"] == {"worker_id": "p0", "node_id": nodes["p0"]}
    keys = receipts.KeySet.from_json({
        "gateways": [signer.published()],
        "nodes": [{"node_id": nodes[w], "public_key": bytes(k.verify_key).hex()}
                  for w, k in node_key.items()]})
    strict = receipts.verify(receipt, keys, {0: EXPECTED})
    assert len(strict.problems) == 1 and "segment 0: not attested" in strict.problems[0]
    lenient = receipts.verify(receipt, keys, {0: EXPECTED}, allow_unattested=True)
    assert lenient.ok, lenient.problems


def test_a_stream_that_failed_before_its_first_token_is_no_segment() -> None:
    """A decode stream that produced nothing (refused before its first token) and sent no
    attestation is left out of the receipt: it holds no tokens to account for."""
    run = make_run(ScriptedSource({"b0": B}, {}), provenance=lambda w: ("n-x", False))
    run.segments = [Segment("b0", "n-x", 0), Segment("b1", "n-y", 0)]
    run.out.token_ids = [1, 2]
    run.out.text = ["ab"]
    signer = ReceiptSigner(SigningKey(bytes([9]) * 32))
    receipt = signer.build(request_id="r1", response_id="cmpl-r1", model="m", tenant=None,
                           created_ms=0, prompt_ids=PROMPT, runs=[run], outputs=[run.out])
    assert receipt is not None
    assert [s["worker_id"] for s in receipt["choices"][0]["segments"]] == ["b1"]


async def test_each_worker_call_is_a_traced_span_with_its_own_traceparent() -> None:
    """Tracing (issue 13 §2): every worker call gets the request's trace id and a span id of
    its own in its `traceparent`, recorded with its outcome and tokens: a prefill retried on
    another worker, a decode continued after its worker died, each a span."""
    source = ScriptedSource({"p0": P, "p1": P, "d0": D, "d1": D},
                            {"p0": ["connect"], "d0": [("die", 5)]})
    ctx = TraceContext(0xABC, 0x1, 0, True)
    run = make_run(source, trace=ctx)

    async def emit(deltas: list[Delta]) -> None:
        pass

    await run.run(emit)
    calls = [(c.kind, c.worker_id, c.outcome, c.tokens) for c in run.calls]
    assert calls == [("prefill", "p0", "connect", 0), ("prefill", "p1", "ok", 0),
                     ("decode", "d0", "worker_error", 5), ("decode", "d1", "ok", 7)]
    sent = [(k, w, parse_traceparent(tp)) for k, w, tp in source.traceparents]
    assert [(k, w) for k, w, _ in sent] == [(c[0], c[1]) for c in calls]
    for (_, _, parent), call in zip(sent, run.calls, strict=True):
        assert parent is not None and parent.trace_id == 0xABC and parent.sampled
        assert parent.span_id == call.span_id
        assert call.start <= call.end
    assert len({c.span_id for c in run.calls}) == 4
    untraced = ScriptedSource({"b0": B}, {})
    await make_run(untraced).run(emit)
    assert untraced.traceparents == [("decode", "b0", "")]  # off: no header, nothing recorded

