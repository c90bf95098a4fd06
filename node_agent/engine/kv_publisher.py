"""KV cache events publisher speaking vLLM's ZMQ wire format (for the global prefix index).

Wire format (vLLM `vllm/distributed/kv_events.py`):
- PUB socket, three frames per batch: `[topic, seq (8-byte big-endian), msgpack payload]`,
  `seq` counting from 0 per publisher.
- Payload: a `KVEventBatch` map `{"ts": float, "events": [...], "data_parallel_rank": int}`;
  each event a map tagged with `"type"`: `BlockStored {block_hashes, parent_block_hash, token_ids,
  block_size, lora_id, medium, lora_name[, extra_keys, group_idx]}`, `BlockRemoved {block_hashes,
  medium[, group_idx]}`, `AllBlocksCleared {}`. Optional fields are omitted when None (msgspec's
  `omit_defaults`). Hashes go out as unsigned 64-bit ints (bytes digests are reduced to their low
  64 bits, as vLLM does). Older vLLM sends array-encoded structs;
  `meshd.scheduler.kv_events.decode_batch` reads both.
- Replay: a ROUTER socket. A DEALER peer (a REQ gets only the first reply) sends
  `[b"", start_seq (8 bytes)]` and gets
  `[b"", seq, payload]` for every buffered batch with seq >= start_seq, then `[b"", -1, b""]`.

Input: any objects whose class is named `BlockStored`, `BlockRemoved` or `AllBlocksCleared` and
that carry the fields above as attributes (the engine's own event dataclasses, or the records
defined here); missing optional attributes count as None.

Threads: `publish()` is called by the engine thread; it encodes the batch (so the caller may
reuse its objects) and enqueues it without blocking. When the bounded queue is full the batch
is dropped and counted. One background thread owns both ZMQ sockets.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from meshd.curve import curve_keys, gate, secure_server

log = logging.getLogger(__name__)

U64 = (1 << 64) - 1
END_SEQ = (-1).to_bytes(8, "big", signed=True)


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: Sequence[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: Sequence[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = "CPU"
    lora_name: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: Sequence[int | bytes]
    medium: str | None = "CPU"
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


def to_u64(h: int | bytes) -> int:
    """A block hash as vLLM's ExternalBlockHash int: the low 64 bits, unsigned."""
    return (int.from_bytes(h, "big") if isinstance(h, bytes | bytearray) else int(h)) & U64


def _opt(event: object, name: str) -> Any:
    return getattr(event, name, None)


def encode_event(event: object, token_ids: bool = True) -> dict[str, Any]:
    """One event as vLLM's map-encoded, tagged struct; `token_ids=False` sends a stored
    block's hashes without its token ids (an empty list: the prompt's text stays home)."""
    kind = type(event).__name__
    if kind == "BlockStored":
        parent = _opt(event, "parent_block_hash")
        out: dict[str, Any] = {
            "type": kind,
            "block_hashes": [to_u64(h) for h in _opt(event, "block_hashes")],
            "parent_block_hash": None if parent is None else to_u64(parent),
            "token_ids": [int(t) for t in _opt(event, "token_ids")] if token_ids else [],
            "block_size": int(_opt(event, "block_size")),
            "lora_id": _opt(event, "lora_id"),
            "medium": _opt(event, "medium"),
            "lora_name": _opt(event, "lora_name"),
        }
        for name in ("extra_keys", "group_idx"):
            if _opt(event, name) is not None:
                out[name] = _opt(event, name)
        return out
    if kind == "BlockRemoved":
        out = {"type": kind, "block_hashes": [to_u64(h) for h in _opt(event, "block_hashes")],
               "medium": _opt(event, "medium")}
        if _opt(event, "group_idx") is not None:
            out["group_idx"] = _opt(event, "group_idx")
        return out
    if kind == "AllBlocksCleared":
        return {"type": kind}
    raise TypeError(f"not a KV cache event: {kind}")


def encode_batch(events: Sequence[object], ts: float, data_parallel_rank: int,
                 token_ids: bool = True) -> bytes:
    batch = {"ts": ts, "events": [encode_event(e, token_ids) for e in events],
             "data_parallel_rank": data_parallel_rank}
    payload: bytes = msgpack.packb(batch, use_bin_type=True)
    return payload


class KVEventPublisher:
    """ZMQ PUB publisher with a bounded replay ring; see the module docstring for the contract.

    `endpoint`/`replay_endpoint` are bound (e.g. "tcp://*:5557"); `replay_endpoint=None` turns
    replay off. Bind errors raise from the constructor. Call `close()` to stop the thread.

    `curve_token`: serve both sockets over CURVE keyed by this token (`meshd.curve`; only
    subscribers holding it connect), in a context of the publisher's own. `token_ids=False`:
    stored blocks go out as hashes only. meshd's workers set both; the defaults are vLLM's
    (open, with token ids).
    """

    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = "kv-events",
        data_parallel_rank: int = 0,
        buffer_steps: int = 10_000,
        max_queue: int = 10_000,
        hwm: int = 100_000,
        clock: Callable[[], float] = time.time,
        context: zmq.Context[Any] | None = None,
        curve_token: str = "",
        token_ids: bool = True,
    ) -> None:
        if buffer_steps < 1 or max_queue < 1:
            raise ValueError("buffer_steps and max_queue: must be >= 1")
        self._token_ids = token_ids
        self._own_ctx = bool(curve_token)  # a ZAP handler belongs to one context
        self._ctx = zmq.Context() if curve_token else context or zmq.Context.instance()
        keys = curve_keys(curve_token) if curve_token else None
        self._auth = gate(self._ctx, keys) if keys else None
        self._topic = topic.encode()
        self._rank = data_parallel_rank
        self._clock = clock
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=max_queue)
        self._ring: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        if keys:
            secure_server(self._pub, keys)
        self._pub.bind(endpoint)
        self._replay: zmq.Socket[Any] | None = None
        if replay_endpoint is not None:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            if keys:
                secure_server(self._replay, keys)
            self._replay.bind(replay_endpoint)
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.replay_endpoint = (
            self._replay.getsockopt_string(zmq.LAST_ENDPOINT) if self._replay else None
        )
        self.published = 0
        self.dropped = 0
        self._seq = 0
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()

    def publish(self, events: Sequence[object]) -> bool:
        """Encode and enqueue one batch; never blocks. False if the queue was full (dropped)."""
        payload = encode_batch(events, self._clock(), self._rank, self._token_ids)
        try:
            self._queue.put_nowait(payload)
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def close(self, timeout_s: float = 1.0) -> None:
        """Flush what is queued (up to `timeout_s`), stop the thread, close the sockets."""
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout_s)
        self._thread.join(timeout=timeout_s)
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        if self._own_ctx:
            self._ctx.term()

    def _run(self) -> None:
        while True:
            if self._replay is not None:
                try:
                    while self._replay.poll(0):
                        self._serve_replay(self._replay)
                except zmq.ZMQError:
                    log.exception("kv events replay failed")
            try:
                payload = self._queue.get(timeout=0.02)
            except queue.Empty:
                continue
            if payload is None:
                return
            seq = self._seq
            self._seq += 1
            try:
                self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
                self.published += 1
            except zmq.ZMQError:
                log.exception("kv events publish failed")
            self._ring.append((seq, payload))

    def _serve_replay(self, sock: zmq.Socket[Any]) -> None:
        frames = sock.recv_multipart()
        if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
            log.warning("kv events: malformed replay request (%d frames)", len(frames))
            return
        client, start = frames[0], int.from_bytes(frames[2], "big")
        for seq, payload in list(self._ring):
            if seq >= start:
                sock.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
        sock.send_multipart((client, b"", END_SEQ, b""))
