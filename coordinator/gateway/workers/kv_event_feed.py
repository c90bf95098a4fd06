"""Feeds the global prefix index from every worker's KV events (ZMQ, vLLM's wire format).

One SUB socket per worker connects to the worker's publisher (workers bind: vLLM's endpoint
`tcp://*:PORT`, the embedded engine's likewise). Frames are `[topic, seq (8 bytes BE),
msgpack payload]`; `meshd.scheduler.kv_events.decode_batch` reads both of vLLM's layouts. When the
index reports a sequence gap, the missed batches are fetched from the worker's replay endpoint
(DEALER: send `[b"", start_seq]`, receive `[b"", seq, payload]` until seq = -1) within a deadline;
if replay is impossible, the worker's entries are dropped and rebuilt from new events.
meshd's workers serve both ports over CURVE keyed by their API token (`meshd.curve`), so the
feed connects with the worker's token; vLLM's are open.

Runs on the gateway's asyncio loop, so the index is only touched from one thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from meshd.curve import CurveKeys, curve_keys, secure_client
from meshd.scheduler.kv_events import KVEventBatch, KVEventDecodeError, decode_batch
from meshd.scheduler.prefix_index import ApplyStatus, PrefixIndex

log = logging.getLogger("meshd.gateway.kv_events")
_END = (-1).to_bytes(8, "big", signed=True)


@dataclass(slots=True)
class FeedStats:
    batches: int = 0
    block_events: int = 0
    gaps: int = 0
    replays: int = 0
    replay_failures: int = 0
    decode_errors: int = 0
    last_event_at: float = 0.0


@dataclass(slots=True)
class _Feed:
    worker_id: str
    endpoint: str
    replay_endpoint: str
    sub: Any
    keys: CurveKeys | None  # the worker's CURVE keys (its API token's), None: an open port
    task: asyncio.Task[None] | None = None
    stats: FeedStats = field(default_factory=FeedStats)


class KVEventFeed:
    """Subscribes to workers' KV events and applies them to `index`.

    `on_batch(worker_id, batch, now)` is called after each applied batch (cache-health checks).
    """

    def __init__(self, index: PrefixIndex, replay_timeout_s: float = 2.0,
                 on_batch: Callable[[str, KVEventBatch, float], None] | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.index = index
        self.replay_timeout_s = replay_timeout_s
        self.on_batch = on_batch
        self.clock = clock or (lambda: asyncio.get_running_loop().time())
        self._ctx = zmq.asyncio.Context.instance()
        self._feeds: dict[str, _Feed] = {}

    def stats(self) -> dict[str, FeedStats]:
        return {wid: f.stats for wid, f in self._feeds.items()}

    def add(self, worker_id: str, endpoint: str, replay_endpoint: str = "",
            token: str = "") -> None:
        """Start following a worker (idempotent for the same endpoint and token). `token`:
        the worker's API token, which keys its ports' CURVE (meshd workers); "": open
        (vLLM's ports)."""
        old = self._feeds.get(worker_id)
        keys = curve_keys(token) if token else None
        if old is not None:
            if old.endpoint == endpoint and old.keys == keys:
                return
            self.remove(worker_id)
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.LINGER, 0)
        if keys:
            secure_client(sub, keys)
        sub.connect(endpoint)
        feed = _Feed(worker_id, endpoint, replay_endpoint, sub, keys)
        self.index.add_worker(worker_id)
        feed.task = asyncio.get_running_loop().create_task(self._run(feed))
        self._feeds[worker_id] = feed

    def remove(self, worker_id: str) -> None:
        """Stop following a worker and drop its entries (worker dead or gone)."""
        feed = self._feeds.pop(worker_id, None)
        if feed is None:
            return
        if feed.task:
            feed.task.cancel()
        feed.sub.close(0)
        self.index.remove_worker(worker_id)

    async def close(self) -> None:
        for wid in list(self._feeds):
            self.remove(wid)
        await asyncio.sleep(0)

    async def _run(self, feed: _Feed) -> None:
        while True:
            frames = await feed.sub.recv_multipart()
            if len(frames) != 3 or len(frames[1]) != 8:
                feed.stats.decode_errors += 1
                continue
            seq = int.from_bytes(frames[1], "big", signed=True)
            await self._apply(feed, seq, frames[2])

    async def _apply(self, feed: _Feed, seq: int, payload: bytes) -> None:
        try:
            batch = decode_batch(seq, payload)
        except KVEventDecodeError as e:
            feed.stats.decode_errors += 1
            log.warning("worker %s: undecodable KV event batch %d: %s", feed.worker_id, seq, e)
            return
        result = self.index.apply_batch(feed.worker_id, batch)
        if result.status is ApplyStatus.GAP:
            feed.stats.gaps += 1
            start = result.replay_from if result.replay_from is not None else 0
            if not await self._replay(feed, start, seq):
                # Unknown history (e.g. subscribed late, ring overrun): drop what we have for
                # this worker rather than keep entries whose removal we may have missed.
                feed.stats.replay_failures += 1
                self.index.resync(feed.worker_id, seq)
            result = self.index.apply_batch(feed.worker_id, batch)
        if result.status is ApplyStatus.APPLIED:
            feed.stats.batches += 1
            feed.stats.block_events += batch.num_block_events()
            feed.stats.last_event_at = self.clock()
            if self.on_batch:
                self.on_batch(feed.worker_id, batch, feed.stats.last_event_at)

    async def _replay(self, feed: _Feed, start: int, until: int) -> bool:
        """Fetch batches [start, until) from the replay endpoint; False if not possible."""
        if not feed.replay_endpoint or start >= until:
            return start >= until
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if feed.keys:
            secure_client(sock, feed.keys)
        sock.connect(feed.replay_endpoint)
        try:
            async with asyncio.timeout(self.replay_timeout_s):
                # inside the deadline: a DEALER with no pipe (a refused handshake) blocks a send
                await sock.send_multipart([b"", start.to_bytes(8, "big", signed=True)])
                while True:
                    frames = await sock.recv_multipart()
                    if len(frames) < 2 or frames[1] == _END:
                        break
                    seq = int.from_bytes(frames[1], "big", signed=True)
                    if seq >= until or len(frames) < 3:
                        continue
                    with contextlib.suppress(KVEventDecodeError):
                        batch = decode_batch(seq, frames[2])
                        if self.index.apply_batch(feed.worker_id, batch).status is \
                                ApplyStatus.APPLIED:
                            feed.stats.block_events += batch.num_block_events()
            feed.stats.replays += 1
            return self.index.expected_seq(feed.worker_id) == until
        except TimeoutError:
            log.warning("worker %s: KV event replay from %d timed out", feed.worker_id, start)
            return False
        finally:
            sock.close(0)
