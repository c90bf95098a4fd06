"""Server-sent events: encoding towards clients and incremental decoding of worker streams.

Encoding works on bytes that are already JSON; nothing here re-serializes a worker's chunk.
`chunk_frame` wraps one SSE event in an HTTP/1.1 chunked-transfer frame so a streamed event is a
single `transport.write`. `SseDecoder` is the worker side: feed it raw body bytes as they
arrive, it returns the `data:` payloads of every complete event (multi-line data joined by
``\\n``, comments and other fields ignored), and `DONE` for ``data: [DONE]``.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"
_DONE_FRAME = b"e\r\ndata: [DONE]\n\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"


def encode_event(data: bytes) -> bytes:
    """One SSE event carrying `data` (must not contain a newline; JSON from orjson never does)."""
    return b"data: " + data + b"\n\n"


def chunk_frame(data: bytes) -> bytes:
    """`encode_event(data)` framed as one HTTP chunk (``<hex len>\\r\\n<event>\\r\\n``)."""
    return b"%x\r\ndata: %b\n\n\r\n" % (len(data) + 8, data)


def done_frame() -> bytes:
    """``data: [DONE]`` as one HTTP chunk."""
    return _DONE_FRAME


def usage_chunk(*, request_id: str, model: str, usage: dict[str, Any], chat: bool,
                created: int | None = None) -> bytes:
    """The final chunk a client asked for with `stream_options.include_usage`: empty `choices`
    and the `usage` object, as OpenAI sends it just before ``[DONE]``. Returns JSON bytes."""
    return orjson.dumps({
        "id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()) if created is None else created, "model": model,
        "choices": [], "usage": usage,
    })


def error_event(message: str, err_type: str = "server_error", code: str | None = None) -> bytes:
    """JSON bytes for an in-stream error (sent when a failure happens after the 200 went out)."""
    return orjson.dumps({"error": {"message": message, "type": err_type, "param": None,
                                   "code": code}})


class SseDecoder:
    """Incremental SSE parser. Not thread-safe; one per stream. Buffers at most one partial
    event; `feed` returns payloads (bytes, owned by the caller) in arrival order."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        out: list[bytes] = []
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            event = buf[start:end]
            start = end + 2
            if event.startswith(b"data: ") and b"\n" not in event:
                out.append(event[6:])  # the common case: one data line
            else:
                payload = _data_lines(event)
                if payload is not None:
                    out.append(payload)
        self._buf = buf[start:]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete event held back."""
        return len(self._buf)


def _data_lines(event: bytes) -> bytes | None:
    lines = [ln[5:].removeprefix(b" ") for ln in event.split(b"\n") if ln.startswith(b"data:")]
    return b"\n".join(lines) if lines else None
