"""Where the mesh path's CPU goes, per request, stage by stage (in-process, no sockets).

    .venv/bin/python benchmarks/mesh_path.py [--requests 20000] [--chunks 8]

Each stage of the gateway's mesh path runs on its own, on the request `benchmarks/gateway.py`
sends (a short chat, `max_tokens` 16): JSON decode + OpenAI validation, chat template +
tokenization + block hashes (`PromptBuilder`), routing (`Router.decide` over two workers),
the choice run (lifecycle + a decode stream of `--chunks` chunks from an in-memory
`WorkerSource`, each chunk JSON-decoded and forwarded), reshaping into the client's
body, and admission with a tenant policy checking every limit (`Governor.admit` + settlement:
loop breaker, reservation on 11 meters from local leases, fair-share slot), with the number of
ledger syncs a request had to wait for. Reported: CPU µs per request per stage
(`time.process_time`, median of 5 rounds) and their sum; the rest of a request's CPU in
`benchmarks/gateway.py` (HTTP parsing and writing on both sides, the event loop, syscalls) is
that figure minus this sum. Writes benchmarks/results/mesh_path.json. Measures; asserts
nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import uvloop

from meshd.coordinator.gateway.config import Deadlines, Limits
from meshd.coordinator.gateway.governance.admission import Governor
from meshd.coordinator.gateway.http.api_request import ApiRequest, Endpoint
from meshd.coordinator.gateway.http.openai_api import parse_chat
from meshd.coordinator.gateway.serving.choice import ChoiceRun, ChoiceSpec, Counters
from meshd.coordinator.gateway.serving.prompts import PromptBuilder
from meshd.coordinator.gateway.serving.shapes import Delta, Shaper, usage
from meshd.scheduler.pd import PDConfig, PDDecider
from meshd.scheduler.prefix_index import PrefixIndex
from meshd.scheduler.profiles import builtin
from meshd.scheduler.router import Router
from meshd.scheduler.types import RequestView, Role, WorkerView

ROOT = Path(__file__).resolve().parents[1]
BODY = orjson.dumps({"model": "fake", "messages": [{"role": "user", "content": "Say hello."}],
                     "max_tokens": 16})


class CannedSource:
    """A `WorkerSource` whose decode streams are `chunks` ready-made vLLM chunks."""

    def __init__(self, chunks: int) -> None:
        self.workers = [WorkerView("w0", Role.BOTH, "fake"), WorkerView("w1", Role.BOTH, "fake")]
        self.events = [orjson.dumps({"id": "cmpl-x", "object": "text_completion",
                                     "created": 1, "model": "fake", "choices": [{
                                         "index": 0, "text": f"t{i} ",
                                         "token_ids": [116, 48 + i % 10, 32],
                                         "finish_reason": "stop" if i == chunks - 1 else None}]})
                       for i in range(chunks)]

    def views(self) -> Sequence[WorkerView]:
        return self.workers

    def mark_failed(self, worker_id: str) -> None:
        raise AssertionError("no failures here")

    async def prefill(self, worker_id: str, body: dict[str, Any], request_id: str,
                      timeout_s: float, queued_tokens: int = 0, traceparent: str = "") -> Any:
        raise AssertionError("colocated: no prefill")

    def stream(self, worker_id: str, body: dict[str, Any], request_id: str,
               timeout_s: float, queued_tokens: int = 0, traceparent: str = "") -> _Events:
        orjson.dumps(body)  # what the client does with it
        return _Events(self.events)


class _Events:
    """An async context manager over ready events, shaped like `SseStream`."""

    def __init__(self, events: list[bytes]) -> None:
        self.events = events

    async def __aenter__(self) -> _Events:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def next_batch(self) -> list[bytes]:
        """Every event at once (they arrive in one read from a fast worker), then the end."""
        out, self.events = self.events, []
        return out


def timed(fn: Callable[[], object], n: int, rounds: int = 5) -> float:
    """Median CPU µs per call over `rounds` rounds of `n` calls."""
    per = []
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        per.append((time.process_time() - t0) / n * 1e6)
    return statistics.median(per)


def measure(n: int, chunks: int) -> dict[str, float]:
    lim = Limits()
    prompts = PromptBuilder()
    router = Router(decode=builtin("decode"), prefill=builtin("prefill"),
                    pd=PDDecider(PDConfig()), index=PrefixIndex())
    source = CannedSource(chunks)
    loop = uvloop.new_event_loop()

    def request() -> ApiRequest:
        obj = orjson.loads(BODY)
        return ApiRequest(Endpoint.CHAT, "rid-1", parse_chat(obj, lim), obj, BODY, None, 0.0)

    req = request()
    prompt = prompts.build(req, 16)
    view = RequestView("rid-1", "fake", len(prompt.token_ids), prompt.block_hashes,
                       max_tokens=16)
    decode = prompts.tokenizer("fake").decode

    async def emit(d: list[Delta]) -> None:
        return None

    def make_run() -> ChoiceRun:
        spec = ChoiceSpec("rid-1", 0, view, prompt.token_ids, {"model": "fake"}, 16, (),
                          decode)
        return ChoiceRun(spec, source, router, Deadlines(), Counters(), time.monotonic)

    async def choices(k: int) -> Any:
        for _ in range(k):
            out = await make_run().run(emit)
        return out

    def run_choices(k: int) -> float:
        """CPU µs per choice run, `k` runs in one task (as the handler runs them)."""
        t0 = time.process_time()
        loop.run_until_complete(choices(k))
        return (time.process_time() - t0) / k * 1e6

    out = loop.run_until_complete(choices(1))
    gov, gov_req = make_governor(lim)

    async def admissions(k: int) -> None:
        for _ in range(k):
            adm = await gov.admit(gov_req, prompt.token_ids)
            adm.finish(16, 0, out.token_ids)

    def run_admissions(k: int) -> float:
        t0 = time.process_time()
        loop.run_until_complete(admissions(k))
        return (time.process_time() - t0) / k * 1e6

    run_admissions(10)  # the first reservation fetches the leases
    stages = {
        "decode + validate": timed(request, n),
        "template + tokenize + hash": timed(lambda: prompts.build(req, 16), n),
        "route": timed(lambda: router.decide(view, source.workers), n),
        f"choice run ({chunks} chunks)": statistics.median(run_choices(n) for _ in range(5)),
        "reshape": timed(lambda: Shaper(req).body([out], usage(len(prompt.token_ids), [out])),
                         n),
        "admission (tenant policy)": statistics.median(run_admissions(n) for _ in range(5)),
    }
    urgent = gov.keeper.syncs
    loop.close()
    stages["sum"] = sum(stages.values())
    stages["ledger syncs on the request path"] = urgent
    return stages


def make_governor(lim: Limits) -> tuple[Governor, ApiRequest]:
    """A governor whose tenant has every limit (high enough never to refuse: the policy of
    `benchmarks/gateway.py`'s meshd-mesh-gov-2), over an in-process ledger, and the bench
    request as that tenant's. No background sync runs: every sync counted is one a request
    waited for."""
    from meshd.config import build
    from meshd.coordinator.gateway.governance.admission import Governor
    from meshd.coordinator.gateway.governance.config import GovernanceConfig
    from meshd.coordinator.ledger_actor import InProcessLedgerClient, LocalLedger

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gateway import GOVERNANCE

    tables = tomllib.loads(GOVERNANCE)["gateway"]["governance"]
    gov = Governor(build(GovernanceConfig, tables, "gateway.governance."),
                   InProcessLedgerClient(LocalLedger()), "bench/0", lim.max_tokens)
    obj = orjson.loads(BODY)
    req = ApiRequest(Endpoint.CHAT, "rid-1", parse_chat(obj, lim), obj, BODY, "bench", 0.0)
    return gov, req


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--chunks", type=int, default=8)
    a = ap.parse_args()
    stages = measure(a.requests, a.chunks)
    print(f"{'stage':34} {'CPU µs/req':>10}")
    print("-" * 45)
    for name, us in stages.items():
        print(f"{name:34} {us:10.1f}" if "syncs" not in name else f"{name:34} {us:10.0f}")
    out = ROOT / "benchmarks" / "results" / "mesh_path.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"requests": a.requests, "chunks": a.chunks,
                               "cpu_us_per_request": stages}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
