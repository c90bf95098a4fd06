"""OpenAI-shaped API errors and request-body decoding, shared by meshd's two OpenAI front ends.

The gateway (`coordinator/gateway/http/`) and the embedded engine's worker server
(`node_agent/engine/`) both raise `ApiError` for anything a client did wrong and both send it as
``{"error": {"message", "type", "param", "code"}}`` with `status`. Both decode request bodies
with `loads_body`, so the JSON one accepts is exactly the JSON the other accepts: strict UTF-8,
no lone surrogates, no NaN or Infinity, nesting at most 1024 deep, numbers that fit a double
(integers beyond 64 bits arrive as floats and then fail an integer field's type check).
"""

from __future__ import annotations

from typing import Any

import orjson


class ApiError(Exception):
    """A client-visible error. `status` is the HTTP status; `param` names the offending field;
    `retry_after` (seconds) becomes a Retry-After header where the server sends one, as do
    `headers` (name, value) pairs (the gateway's `x-ratelimit-*` on a 429)."""

    __slots__ = ("code", "err_type", "headers", "message", "param", "retry_after", "status")

    def __init__(self, status: int, message: str, *, err_type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 retry_after: float | None = None,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def to_dict(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.err_type,
                          "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        """The JSON body bytes (fresh each call; cheap)."""
        return orjson.dumps(self.to_dict())

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.message!r}, param={self.param!r})"


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """400 invalid_request_error naming `param`."""
    return ApiError(400, message, param=param, code=code)


def loads_body(raw: bytes) -> Any:
    """The decoded JSON body, or ApiError(400) saying why it is not acceptable JSON."""
    if not raw:
        raise invalid("The request body is empty; send a JSON object.")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise invalid(f"Malformed JSON body: {e}") from None
