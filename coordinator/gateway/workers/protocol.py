"""Does a worker speak the mesh path's protocol? Checked once when it joins.

The mesh path sends token-id prompts and asks for `return_token_ids` (vLLM's extension,
answered by vLLM >= 0.10.2 and the embedded engine): a continuation after a failure starts
from exactly the ids already forwarded, and usage counts come from them. A worker that
ignores the field would stream text without ids, and the gateway would lose track of what
was sent. So on join the pool sends one 1-token completion with `return_token_ids` and reads
the answer:

    mesh     the choice carries `token_ids`: routed by the mesh path
    plain    it answered without them (or refused the field): it only takes requests passed
             through as they are (`serving/passthrough.py`), and only for a model that no
             mesh-capable worker serves; `meshd status` shows why
    unknown  no answer (unreachable, 5xx, timeout): routed as before, asked again on the next
             membership refresh

The same probe asks for `meshd_confidence` (meshd's extension: the worker scores each token it
samples, exp(-entropy) over its whole vocabulary): a worker that answers with it (`scores`) is
asked for those floats instead of top-k logprobs when only the gateway's confidence meter
needs them (docs/trust.md); vLLM ignores the field.

A mesh worker is then asked for one token under `response_format: {"type": "json_object"}`:
one that answers (`constrains`: vLLM, whose structured outputs enforce the format while it
samples) is where the mesh path sends requests with a `response_format` (or a Responses
`text.format`) other than text; one that refuses it (meshd's embedded engine) is not.
"""

from __future__ import annotations

from typing import NamedTuple

import orjson

from meshd.coordinator.gateway.workers.client import BackendError, BackendPool

MESH, PLAIN, UNKNOWN = "mesh", "plain", "unknown"


class ProbeResult(NamedTuple):
    protocol: str  # MESH | PLAIN | UNKNOWN
    detail: str  # why, in words an operator reads in `meshd status`
    scores: bool = False  # it scores its own tokens (`meshd_confidence`)
    constrains: bool = False  # it enforces a `response_format` while it samples


async def probe(pool: BackendPool, model: str, timeout_s: float = 5.0) -> ProbeResult:
    body = orjson.dumps({"model": model, "prompt": [0, 1], "max_tokens": 1, "temperature": 0,
                         "return_token_ids": True, "meshd_confidence": True})
    try:
        r = await pool.request("POST", "/v1/completions", body, timeout=timeout_s)
    except BackendError as e:
        return ProbeResult(UNKNOWN, f"probe failed: {e}")
    if r.status >= 500:
        return ProbeResult(UNKNOWN, f"probe answered HTTP {r.status}")
    if r.status >= 400:
        return ProbeResult(PLAIN, f"refuses return_token_ids (HTTP {r.status}); proxied as "
                                  "plain OpenAI")
    try:
        choice = orjson.loads(r.body)["choices"][0]
        ids = choice.get("token_ids")
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return ProbeResult(PLAIN, "answers completions in an unexpected shape; proxied as "
                                  "plain OpenAI")
    if isinstance(ids, list) and ids and all(type(t) is int for t in ids):
        conf = choice.get("meshd_confidence")
        scores = isinstance(conf, list) and len(conf) == len(ids)
        constrains = await _constrains(pool, model, timeout_s)
        return ProbeResult(MESH, "returns token ids" + (", scores its tokens" if scores
                                                         else "")
                           + (", constrained decoding" if constrains else ""),
                           scores, constrains)
    return ProbeResult(PLAIN, "ignores return_token_ids (needs vLLM >= 0.10.2); proxied as "
                              "plain OpenAI")


async def _constrains(pool: BackendPool, model: str, timeout_s: float) -> bool:
    """Does it answer a 1-token completion under `response_format: json_object`?"""
    body = orjson.dumps({"model": model, "prompt": [0, 1], "max_tokens": 1, "temperature": 0,
                         "return_token_ids": True, "response_format": {"type": "json_object"}})
    try:
        r = await pool.request("POST", "/v1/completions", body, timeout=timeout_s)
    except BackendError:
        return False
    return 200 <= r.status < 300
