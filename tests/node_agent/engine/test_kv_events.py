"""KV events publisher: vLLM wire format over ZMQ PUB, sequence numbers, replay, drops."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq

from meshd.node_agent.engine.kv_publisher import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventPublisher,
    encode_event,
)
from meshd.scheduler.kv_events import BlockStored as StoredEvent
from meshd.scheduler.kv_events import decode_batch

H = bytes(range(32))  # a sha256-sized digest; low 64 bits = bytes 24..31
H_U64 = int.from_bytes(H[24:], "big")


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.term()


def make_publisher(ctx: zmq.Context[Any], **kw: Any) -> KVEventPublisher:
    return KVEventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", topic="kv",
                            clock=lambda: 12.5, context=ctx, **kw)


def make_sub(ctx: zmq.Context[Any], pub: KVEventPublisher) -> zmq.Socket[Any]:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    sub.setsockopt(zmq.RCVTIMEO, 5000)
    sub.connect(pub.endpoint)
    time.sleep(0.2)  # PUB/SUB slow joiner
    return sub


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (BlockStored([H, 7], None, [1, 2, 3, 4], 2, medium="GPU"),
         {"type": "BlockStored", "block_hashes": [H_U64, 7], "parent_block_hash": None,
          "token_ids": [1, 2, 3, 4], "block_size": 2, "lora_id": None, "medium": "GPU",
          "lora_name": None}),
        (BlockStored([1], -1, [9], 1, group_idx=0),
         {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": (1 << 64) - 1,
          "token_ids": [9], "block_size": 1, "lora_id": None, "medium": "CPU",
          "lora_name": None, "group_idx": 0}),
        (BlockRemoved([H]), {"type": "BlockRemoved", "block_hashes": [H_U64], "medium": "CPU"}),
        (AllBlocksCleared(), {"type": "AllBlocksCleared"}),
    ],
)
def test_encode_event(event: object, expected: dict[str, Any]) -> None:
    assert encode_event(event) == expected


def test_subscriber_receives_published_batches(ctx: zmq.Context[Any]) -> None:
    pub = make_publisher(ctx, data_parallel_rank=3)
    sub = make_sub(ctx, pub)
    batches = [[BlockStored([i], i - 1 if i else None, [i] * 2, 2)] for i in range(5)]
    batches.append([BlockRemoved([0, 1]), AllBlocksCleared()])
    for events in batches:
        assert pub.publish(events)
    seqs = []
    for events in batches:
        topic, seq, payload = sub.recv_multipart()
        assert topic == b"kv" and len(seq) == 8
        seqs.append(int.from_bytes(seq, "big"))
        raw = msgpack.unpackb(payload)
        assert raw == {"ts": 12.5, "events": [encode_event(e) for e in events],
                       "data_parallel_rank": 3}
    assert seqs == list(range(len(batches)))
    sub.close()
    pub.close()


def test_replay_returns_missed_batches(ctx: zmq.Context[Any]) -> None:
    pub = make_publisher(ctx, buffer_steps=4)
    for i in range(6):
        pub.publish([BlockStored([i], None, [i], 1)])
    deadline = time.monotonic() + 5
    while pub.published < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pub.replay_endpoint is not None
    req = ctx.socket(zmq.DEALER)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVTIMEO, 5000)
    req.connect(pub.replay_endpoint)
    req.send_multipart([b"", (3).to_bytes(8, "big")])
    got = []
    while True:
        empty, seq, payload = req.recv_multipart()
        assert empty == b""
        n = int.from_bytes(seq, "big", signed=True)
        if n == -1:
            assert payload == b""
            break
        stored = decode_batch(n, payload).events[0]
        assert isinstance(stored, StoredEvent)
        got.append((n, list(stored.block_hashes)))
    assert got == [(3, [3]), (4, [4]), (5, [5])]
    # Asking for more than the ring holds returns what is left (seq 2 onward), then the end.
    req.send_multipart([b"", (0).to_bytes(8, "big")])
    seqs = []
    while (n := int.from_bytes(req.recv_multipart()[1], "big", signed=True)) != -1:
        seqs.append(n)
    assert seqs == [2, 3, 4, 5]
    req.close()
    pub.close()


def test_publish_never_blocks_and_counts_drops(ctx: zmq.Context[Any]) -> None:
    pub = make_publisher(ctx, max_queue=1)
    start = time.monotonic()
    accepted = [pub.publish([AllBlocksCleared()]) for _ in range(2000)]
    assert time.monotonic() - start < 2.0
    assert pub.dropped == accepted.count(False) and pub.dropped > 0
    pub.close()
