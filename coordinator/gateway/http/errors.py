"""OpenAI-shaped API errors: the one exception type the gateway turns into an HTTP error reply.

Raise `ApiError` (or use the helpers) anywhere between request parsing and the first byte of a
response; the server encodes it as ``{"error": {"message", "type", "param", "code"}}`` with the
given status. The lifecycle uses `rate_limited`, `unavailable` and `gateway_timeout` for 429,
503 and 504.
"""

from __future__ import annotations

import orjson


class ApiError(Exception):
    """A client-visible error. `status` is the HTTP status; `param` names the offending field."""

    __slots__ = ("code", "err_type", "message", "param", "retry_after", "status")

    def __init__(self, status: int, message: str, *, err_type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
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


def unauthorized() -> ApiError:
    return ApiError(401, "Invalid or missing API key (send 'Authorization: Bearer <key>').",
                    err_type="authentication_error", code="invalid_api_key")


def not_found(path: str) -> ApiError:
    return ApiError(404, f"Unknown route {path!r}.", err_type="not_found_error",
                    code="not_found")


def method_not_allowed(method: str, path: str) -> ApiError:
    return ApiError(405, f"Method {method} is not allowed on {path!r}.",
                    code="method_not_allowed")


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"Request body exceeds the limit of {limit} bytes.",
                    code="request_too_large")


def unsupported_media_type(content_type: str) -> ApiError:
    return ApiError(415, f"Content-Type must be application/json, got {content_type!r}.",
                    code="unsupported_media_type")


def rate_limited(message: str = "Too many requests; retry later.",
                 retry_after: float | None = 1.0) -> ApiError:
    """429 for admission control; `retry_after` (seconds) becomes a Retry-After header."""
    return ApiError(429, message, err_type="rate_limit_error", code="rate_limit_exceeded",
                    retry_after=retry_after)


def unavailable(message: str = "No worker is available for this request.",
                retry_after: float | None = None) -> ApiError:
    """503: no healthy worker, or the gateway is draining."""
    return ApiError(503, message, err_type="server_error", code="service_unavailable",
                    retry_after=retry_after)


def gateway_timeout(message: str = "The worker did not answer in time.") -> ApiError:
    """504: a deadline towards a worker passed."""
    return ApiError(504, message, err_type="server_error", code="timeout")


def bad_gateway(message: str = "The worker failed.") -> ApiError:
    """502: a worker answered with a protocol error or vanished mid-request."""
    return ApiError(502, message, err_type="server_error", code="bad_gateway")


def internal(message: str = "Internal gateway error.") -> ApiError:
    return ApiError(500, message, err_type="server_error", code="internal_error")
