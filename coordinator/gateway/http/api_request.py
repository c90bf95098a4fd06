"""The seam between the HTTP layer and the request lifecycle.

The server parses and validates a request into an `ApiRequest`, then awaits
`handler.handle(req, responder)` in a task of its own. The handler answers through the
`Responder` (one full response, or a stream of SSE events) and may raise `ApiError` before it
has started a response (the server sends it as an OpenAI error). If the client disconnects, or
the handler's time (`deadlines.total_s` + `http.handler_grace_s`) runs out, the server cancels
that task: `CancelledError` arrives at the handler's current `await`, and the worker calls it
is inside abort their worker connections.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from meshd.coordinator.gateway.http.openai_api import ChatRequest, CompletionRequest

if TYPE_CHECKING:
    from meshd.coordinator.gateway.http.responder import Responder


class Endpoint(enum.Enum):
    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"
    MESSAGES = "/v1/messages"  # Anthropic Messages: a ChatRequest with its conversation
    RESPONSES = "/v1/responses"  # OpenAI Responses: the same


@dataclass(frozen=True, slots=True)
class ApiRequest:
    """One validated request. `payload` is the decoded JSON body, shared and read-only by
    convention (copy before changing); `raw` is the body exactly as the client sent it, for
    pass-through. `tenant` is the API key's tenant, or None without auth. `received_at` is
    the event loop's clock when the request was complete."""

    endpoint: Endpoint
    request_id: str
    body: ChatRequest | CompletionRequest
    payload: dict[str, Any]
    raw: bytes
    tenant: str | None
    received_at: float
    privacy: str = ""  # the client's x-meshd-privacy header ("sensitive", "auto" or "")
    halt_below: str = ""  # the client's x-meshd-halt-below header (a confidence threshold)
    receipt: str = ""  # the client's x-meshd-receipt header (true|false; "": the tenant's)
    traceparent: bytes | None = None  # the client's W3C traceparent header, as sent
    # MESSAGES / RESPONSES: the dialect's own request (`dialects.anthropic.MessagesRequest`,
    # `dialects.responses.ResponsesRequest`), for the response's shape
    dialect: Any = None

    @property
    def stream(self) -> bool:
        return self.body.stream

    @property
    def model(self) -> str:
        return self.body.model


class Handler(Protocol):
    """Answers one request. Must send exactly one response through `responder` or raise."""

    async def handle(self, req: ApiRequest, responder: Responder) -> None: ...
