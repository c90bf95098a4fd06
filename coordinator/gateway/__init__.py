"""OpenAI-compatible gateway: HTTP server, request validation, worker client pool, SSE.

Map: `server` (GatewayServer) + `server_conn` (one client connection) + `responder` (answering
one request) + `routes`/`openapi` (what is served); `openai_api` (body validation into typed
requests); `handler` (the `Handler` protocol and `ApiRequest`, the seam for the lifecycle);
`backend` + `backend_conn` (keep-alive client pool to workers); `sse`; `proxy` (default
round-robin handler); `errors`; `stats`; `config`.
"""

from meshd.coordinator.gateway.backend import (
    BackendConnectError,
    BackendError,
    BackendHTTPError,
    BackendPool,
    BackendProtocolError,
    BackendTimeout,
    JsonResponse,
    RawResponse,
    SseStream,
)
from meshd.coordinator.gateway.config import GatewayConfig
from meshd.coordinator.gateway.errors import ApiError
from meshd.coordinator.gateway.handler import ApiRequest, Endpoint, Handler
from meshd.coordinator.gateway.openai_api import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    Limits,
    Sampling,
)
from meshd.coordinator.gateway.proxy import ProxyHandler, to_api_error
from meshd.coordinator.gateway.responder import Responder
from meshd.coordinator.gateway.server import GatewayServer

__all__ = [
    "ApiError", "ApiRequest", "BackendConnectError", "BackendError", "BackendHTTPError",
    "BackendPool", "BackendProtocolError", "BackendTimeout", "ChatMessage", "ChatRequest",
    "CompletionRequest", "Endpoint", "GatewayConfig", "GatewayServer", "Handler",
    "JsonResponse", "Limits", "ProxyHandler", "RawResponse", "Responder", "Sampling",
    "SseStream", "to_api_error",
]
