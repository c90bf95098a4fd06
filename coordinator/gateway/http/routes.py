"""The route table: the single list of (method, path) the server serves.

`openapi.py` documents exactly these; a test keeps the two equal.
"""

from __future__ import annotations

import enum


class Route(enum.Enum):
    CHAT = "chat"
    COMPLETIONS = "completions"
    MESSAGES = "messages"  # Anthropic Messages
    COUNT_TOKENS = "count_tokens"  # Anthropic's /v1/messages/count_tokens
    RESPONSES = "responses"  # OpenAI Responses
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

# Routes that need `Authorization: Bearer` when API keys are configured.
AUTHENTICATED = frozenset({Route.CHAT, Route.COMPLETIONS, Route.MESSAGES, Route.RESPONSES,
                           Route.COUNT_TOKENS, Route.MODELS, Route.USAGE, Route.KEYS})
# Routes whose requests run a handler (the inference endpoints).
INFERENCE = frozenset({Route.CHAT, Route.COMPLETIONS, Route.MESSAGES, Route.RESPONSES})


def served() -> set[tuple[str, str]]:
    """{(method, path)} in lower-case method form as OpenAPI writes it."""
    return {(m.decode().lower(), p.decode()) for p, ms in ROUTES.items() for m in ms}
