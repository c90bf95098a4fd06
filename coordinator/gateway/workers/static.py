"""Static workers: servers the operator already runs, named by URL in `[gateway] static_workers`.

`URL` or `ROLE=URL` is a vLLM-protocol server (vLLM or a meshd engine) that takes part in
disaggregated serving; `openai=URL` any other OpenAI-compatible server, which the gateway
proxies to as it is. Their models come from their `/v1/models`. With
`static_workers_token_file`, every call to them carries that bearer token.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import orjson

from meshd.capabilities import API_TOKEN, Member, Worker
from meshd.coordinator.gateway.workers.client import BackendError, BackendPool
from meshd.node_agent.engine.worker_config import first_line

log = logging.getLogger("meshd.gateway.workers")


def static_token(path: str) -> str:
    """The token of `[gateway] static_workers_token_file` ("" without one); ValueError naming
    the field when the file is unreadable, empty or not a usable header value."""
    if not path:
        return ""
    token = first_line(str(Path(path).expanduser()), "gateway.static_workers_token_file")
    if not API_TOKEN.fullmatch(token):
        raise ValueError("gateway.static_workers_token_file: the first line must be a token "
                         "of 16-256 visible ASCII characters")
    return token


async def discover_static(entries: Sequence[str], timeout_s: float = 5.0,
                          api_token: str = "") -> list[Member]:
    """A member on node "static" (no attributes, no expert placement) for each entry's first
    model. An unreachable one is skipped this round (and retried on the next)."""
    out: list[Member] = []
    for i, entry in enumerate(entries):
        role, _, url = entry.rpartition("=")
        try:
            pool = BackendPool.from_url(url, api_token=api_token)
        except ValueError as e:  # the others still join
            log.warning("static worker %r skipped: %s", entry, e)
            continue
        try:
            r = await pool.request("GET", "/v1/models", timeout=timeout_s)
            if r.status >= 300:  # e.g. 401: static_workers_token_file missing or wrong
                log.warning("static worker %s: /v1/models answered HTTP %d", url, r.status)
                continue
            models = [m["id"] for m in orjson.loads(r.body).get("data", [])]
        except (BackendError, orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            log.warning("static worker %s: %s", url, e)
            continue
        finally:
            await pool.close()
        for model in models[:1]:
            plain = role == "openai"
            out.append(Member("static", Worker(f"static-{i}", url.rstrip("/"),
                                               "both" if plain else (role or "both"), model,
                                               engine="openai" if plain else "static",
                                               api_token=api_token)))
    return out
