"""Worker failure -> lifecycle action -> client error: the one place the gateway maps them.

    classify(exc)                 what a failed exchange with a worker means (`Failure`)
    recovery(lc, failure, now)    what the choice run does next (`Action`; pure)
    rejection(e)                  a worker's 4xx, passed to the client with the worker's words
    give_up(lc, failure, detail)  the client's 503/504 once nothing is left to try
    no_worker(model)              503 when routing finds no worker at all
    passthrough_error(e)          for the pass-through paths, which never retry mid-response

A worker's 4xx on the mesh path is a gateway bug (the gateway validates exactly what workers
accept); it is still passed on as the worker said it, never retried elsewhere.
"""

from __future__ import annotations

import orjson

from meshd.coordinator.gateway.http import errors
from meshd.coordinator.gateway.http.errors import ApiError
from meshd.coordinator.gateway.serving.lifecycle import Action, Failure, Lifecycle, Phase
from meshd.coordinator.gateway.workers.client import (
    BackendConnectError,
    BackendError,
    BackendHTTPError,
    BackendTimeout,
)


def classify(e: BaseException, lc: Lifecycle | None = None, now: float = 0.0) -> Failure:
    """`e` from a worker exchange (a `BackendError`, or `TimeoutError` from our own step
    timer). Our step timer firing past the request's deadline is `DEADLINE`, not `TIMEOUT`."""
    if isinstance(e, TimeoutError):
        return Failure.DEADLINE if lc is not None and lc.remaining(now) <= 0 else Failure.TIMEOUT
    if isinstance(e, BackendHTTPError):
        if e.status == 429:  # e.g. a prefill worker at its KV lease bound
            return Failure.BUSY
        if e.status in (401, 403):  # the worker refused our credential: its fault or ours,
            return Failure.WORKER_ERROR  # never the client's (try another worker)
        return Failure.BAD_REQUEST if 400 <= e.status < 500 else Failure.WORKER_ERROR
    if isinstance(e, BackendTimeout):
        return Failure.TIMEOUT
    if isinstance(e, BackendConnectError):
        return Failure.CONNECT
    return Failure.WORKER_ERROR


def recovery(lc: Lifecycle, failure: Failure, now: float) -> Action:
    """What to do after `failure` in `lc`'s current phase. Pure: no state change.

    prefill fails: another prefill worker while attempts remain, else the decode worker
    prefills locally; decode (or the transfer before its first token) fails: continue on
    another worker from the tokens already sent while attempts remain. Never past the
    deadline; never after a rejection, a cancellation or the deadline itself."""
    if failure in (Failure.BAD_REQUEST, Failure.CANCELLED, Failure.DEADLINE):
        return Action.GIVE_UP
    if lc.remaining(now) <= 0:
        return Action.GIVE_UP
    d = lc.deadlines
    if lc.phase is Phase.PREFILL:
        if lc.prefill_attempts < d.max_prefill_attempts and failure is not Failure.NO_WORKER:
            return Action.RETRY_PREFILL
        return Action.LOCAL_PREFILL
    if lc.phase in (Phase.TRANSFER, Phase.DECODE):
        if lc.decode_attempts < d.max_decode_attempts:
            return Action.CONTINUE_DECODE
        return Action.GIVE_UP
    return Action.GIVE_UP


def rejection(e: BackendHTTPError) -> ApiError:
    """A worker's 4xx, passed to the client with the worker's own message when it has one."""
    try:
        err = orjson.loads(e.body)["error"]
        return ApiError(e.status, str(err.get("message")), param=err.get("param"),
                        err_type=str(err.get("type") or "invalid_request_error"),
                        code=err.get("code"))
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return ApiError(e.status, f"The worker rejected the request (HTTP {e.status}).")


def give_up(lc: Lifecycle, failure: Failure, detail: str, now: float) -> ApiError:
    """Finish `lc` as failed and say why: 504 when a deadline ran out, else 503."""
    timed_out = failure in (Failure.TIMEOUT, Failure.DEADLINE) or lc.remaining(now) <= 0
    lc.finish_failed(now, "timeout" if timed_out else "worker_failed")
    if timed_out:
        return ApiError(504, f"The request did not complete within its deadline ({detail}).",
                        err_type="server_error", code="timeout")
    return ApiError(503, f"The request failed on every worker tried ({detail}).",
                    err_type="server_error", code="worker_failed")


def no_worker(model: str) -> ApiError:
    return ApiError(503, f"No healthy worker can serve model {model!r}.",
                    err_type="server_error", code="no_worker", retry_after=1.0)


def passthrough_error(e: BackendError) -> ApiError:
    """Client-facing error for a failed pass-through exchange (proxy, plain OpenAI workers)."""
    if isinstance(e, BackendTimeout):
        return errors.gateway_timeout(f"Worker {e.backend} timed out.")
    if isinstance(e, BackendConnectError):
        return errors.unavailable(f"Worker {e.backend} is unreachable.")
    if isinstance(e, BackendHTTPError):
        return ApiError(502 if e.status < 500 else e.status,
                        f"Worker {e.backend} answered HTTP {e.status}.",
                        err_type="server_error", code="worker_error")
    return errors.bad_gateway(f"Worker {e.backend} failed: {e}")
