import pytest

from meshd.coordinator.gateway.config import Deadlines
from meshd.coordinator.gateway.serving.failures import classify, recovery
from meshd.coordinator.gateway.serving.lifecycle import (
    Action,
    Failure,
    InvalidTransition,
    Lifecycle,
    Phase,
)
from meshd.coordinator.gateway.workers.client import BackendHTTPError


def make(**kw: float) -> Lifecycle:
    return Lifecycle("r1", started_at=100.0, deadlines=Deadlines(**kw))  # type: ignore[arg-type]


def test_disaggregated_happy_path() -> None:
    lc = make()
    for i, ph in enumerate([Phase.PREFILL, Phase.TRANSFER, Phase.DECODE, Phase.DONE]):
        lc.advance(ph, 100.0 + i)
    assert [h[0] for h in lc.history] == [Phase.ADMITTED, Phase.PREFILL, Phase.TRANSFER,
                                          Phase.DECODE, Phase.DONE]
    assert (lc.prefill_attempts, lc.decode_attempts, lc.outcome) == (1, 1, "ok")


@pytest.mark.parametrize(("frm", "to"), [
    (Phase.ADMITTED, Phase.TRANSFER), (Phase.ADMITTED, Phase.DONE),
    (Phase.TRANSFER, Phase.PREFILL), (Phase.DONE, Phase.DECODE), (Phase.FAILED, Phase.DONE)])
def test_invalid_transitions(frm: Phase, to: Phase) -> None:
    lc = make()
    lc.phase = frm
    with pytest.raises(InvalidTransition):
        lc.advance(to, 101.0)


@pytest.mark.parametrize(("phase", "attempts", "failure", "expected"), [
    (Phase.PREFILL, 1, Failure.CONNECT, Action.RETRY_PREFILL),
    (Phase.PREFILL, 1, Failure.TIMEOUT, Action.RETRY_PREFILL),
    (Phase.PREFILL, 2, Failure.TIMEOUT, Action.LOCAL_PREFILL),
    (Phase.PREFILL, 1, Failure.NO_WORKER, Action.LOCAL_PREFILL),
    (Phase.PREFILL, 1, Failure.BAD_REQUEST, Action.GIVE_UP),
    (Phase.PREFILL, 1, Failure.BUSY, Action.RETRY_PREFILL),
    (Phase.PREFILL, 2, Failure.BUSY, Action.LOCAL_PREFILL),
    (Phase.DECODE, 1, Failure.WORKER_ERROR, Action.CONTINUE_DECODE),
    (Phase.TRANSFER, 1, Failure.TIMEOUT, Action.CONTINUE_DECODE),
    (Phase.DECODE, 3, Failure.CONNECT, Action.GIVE_UP),
    (Phase.DECODE, 1, Failure.CANCELLED, Action.GIVE_UP),
    (Phase.DECODE, 1, Failure.DEADLINE, Action.GIVE_UP),
])
def test_recovery_table(phase: Phase, attempts: int, failure: Failure, expected: Action) -> None:
    lc = make()
    lc.phase = phase
    lc.prefill_attempts = attempts
    lc.decode_attempts = attempts
    assert recovery(lc, failure, 110.0) is expected


def test_no_recovery_past_the_deadline_and_step_timeouts_are_capped() -> None:
    lc = make(total_s=10.0, prefill_s=30.0)
    lc.advance(Phase.PREFILL, 101.0)
    assert lc.step_timeout(101.0, lc.deadlines.prefill_s) == 9.0
    assert recovery(lc, Failure.TIMEOUT, 111.0) is Action.GIVE_UP
    lc.finish_failed(111.0, "deadline")
    assert lc.phase is Phase.FAILED and lc.outcome == "deadline"


def test_deadlines_validate() -> None:
    with pytest.raises(ValueError, match="inter_token_s"):
        Deadlines(inter_token_s=0)


@pytest.mark.parametrize(("status", "failure"), [
    (400, Failure.BAD_REQUEST),  # the client's own fault: passed on, never retried
    (429, Failure.BUSY),  # e.g. a prefill worker at its KV lease bound: try another
    (401, Failure.WORKER_ERROR),  # the worker refused the gateway's token: not the client's
    (403, Failure.WORKER_ERROR),
    (500, Failure.WORKER_ERROR),
])
def test_worker_statuses_classify(status: int, failure: Failure) -> None:
    assert classify(BackendHTTPError(status, b"{}", "w:1")) is failure
