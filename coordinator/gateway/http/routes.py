"""The route table: the single list of (method, path) the server serves.

`openapi.py` documents exactly these; a test keeps the two equal.
"""

from __future__ import annotations

import enum
import re


class Route(enum.Enum):
    CHAT = "chat"
    COMPLETIONS = "completions"
    MESSAGES = "messages"  # Anthropic Messages
    COUNT_TOKENS = "count_tokens"  # Anthropic's /v1/messages/count_tokens
    RESPONSES = "responses"  # OpenAI Responses
    RESPONSE_ITEM = "response_item"  # GET / DELETE /v1/responses/{id}, GET .../input_items
    MODELS = "models"
    HEALTH = "health"
    METRICS = "metrics"
    OPENAPI = "openapi"
    CACHE_HEALTH = "cache_health"
    WORKERS = "workers"
    USAGE = "usage"
    GOVERNANCE = "governance"
    KEYS = "keys"
    REQUESTS = "requests"


ROUTES: dict[bytes, dict[bytes, Route]] = {
    b"/v1/chat/completions": {b"POST": Route.CHAT},
    b"/v1/completions": {b"POST": Route.COMPLETIONS},
    b"/v1/messages": {b"POST": Route.MESSAGES},
    b"/v1/messages/count_tokens": {b"POST": Route.COUNT_TOKENS},
    b"/v1/responses": {b"POST": Route.RESPONSES},
    b"/v1/models": {b"GET": Route.MODELS},
    b"/health": {b"GET": Route.HEALTH},
    b"/metrics": {b"GET": Route.METRICS},
    b"/openapi.json": {b"GET": Route.OPENAPI},
    b"/debug/cache-health": {b"GET": Route.CACHE_HEALTH},
    b"/debug/workers": {b"GET": Route.WORKERS},
    b"/v1/meshd/usage": {b"GET": Route.USAGE},
    b"/debug/governance": {b"GET": Route.GOVERNANCE},
    b"/v1/meshd/keys": {b"GET": Route.KEYS},
    b"/debug/requests": {b"GET": Route.REQUESTS},
}

# Paths with an id: prefix -> methods (the id is the rest of the path, `item_id`)
ITEMS: dict[bytes, dict[bytes, Route]] = {
    b"/v1/responses/": {b"GET": Route.RESPONSE_ITEM, b"DELETE": Route.RESPONSE_ITEM},
}
# an item's id, then optionally one of its sub-resources (GET only)
_ITEM_ID = re.compile(rb"([A-Za-z0-9_\-]{1,128})(/input_items)?")
_SUB_METHODS = {b"GET": Route.RESPONSE_ITEM}


def route_of_item(path: bytes) -> dict[bytes, Route] | None:
    """The methods of a path with an id (`/v1/responses/resp_...`, or its `/input_items`),
    None if it is not one."""
    for prefix, methods in ITEMS.items():
        if path.startswith(prefix):
            m = _ITEM_ID.fullmatch(path[len(prefix):])
            if m is not None:
                return methods if m.group(2) is None else _SUB_METHODS
    return None


def item_id(path: bytes) -> tuple[str, str]:
    """The id of an item path and its sub-resource ("" for the item itself; the query string
    dropped)."""
    path = path.split(b"?", 1)[0]
    for prefix in ITEMS:
        if path.startswith(prefix):
            m = _ITEM_ID.fullmatch(path[len(prefix):])
            if m is not None:
                return m.group(1).decode("ascii"), (m.group(2) or b"/").decode("ascii")[1:]
    return path.rsplit(b"/", 1)[1].decode("ascii"), ""


# Routes that need `Authorization: Bearer` when API keys are configured.
AUTHENTICATED = frozenset({Route.CHAT, Route.COMPLETIONS, Route.MESSAGES, Route.RESPONSES,
                           Route.COUNT_TOKENS, Route.RESPONSE_ITEM, Route.MODELS, Route.USAGE,
                           Route.KEYS})
# Routes whose requests run a handler (the inference endpoints).
INFERENCE = frozenset({Route.CHAT, Route.COMPLETIONS, Route.MESSAGES, Route.RESPONSES})


def served() -> set[tuple[str, str]]:
    """{(method, path)} in lower-case method form as OpenAPI writes it (an item path as
    `{prefix}{id}`)."""
    out = {(m.decode().lower(), p.decode()) for p, ms in ROUTES.items() for m in ms}
    out |= {(m.decode().lower(), p.decode() + "{id}") for p, ms in ITEMS.items() for m in ms}
    return out | {(m.decode().lower(), p.decode() + "{id}/input_items") for p in ITEMS
                  for m in _SUB_METHODS}
