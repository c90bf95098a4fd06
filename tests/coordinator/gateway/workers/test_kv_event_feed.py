"""The gateway's KV event feed: a real publisher, real ZMQ sockets, the real prefix index."""

from __future__ import annotations

import asyncio
import contextlib

from support.control import wait_for

from meshd.coordinator.gateway.workers.kv_event_feed import KVEventFeed
from meshd.node_agent.engine.kv_publisher import BlockRemoved, BlockStored, KVEventPublisher
from meshd.scheduler.prefix_index import PrefixIndex


def stored(*hashes: int, parent: int | None = None) -> BlockStored:
    return BlockStored(block_hashes=list(hashes), parent_block_hash=parent,
                       token_ids=list(range(16 * len(hashes))), block_size=16, medium="GPU")


def endpoint(ep: str) -> str:
    return ep.replace("0.0.0.0", "127.0.0.1")


async def test_events_reach_the_index_and_removals_apply() -> None:
    pub = KVEventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    index = PrefixIndex()
    feed = KVEventFeed(index)
    try:
        feed.add("w1", endpoint(pub.endpoint), endpoint(pub.replay_endpoint or ""))
        await asyncio.sleep(0.3)  # SUB connect (slow joiner)
        pub.publish([stored(11, 12, 13)])
        await wait_for(lambda: index.match([11, 12, 13, 14]) == {"w1": 3}, 5)
        pub.publish([BlockRemoved(block_hashes=[13], medium="GPU")])
        await wait_for(lambda: index.match([11, 12, 13]) == {"w1": 2}, 5)
        index.check_integrity()
        feed.remove("w1")
        assert index.match([11, 12]) == {}
    finally:
        await feed.close()
        pub.close()


async def test_late_subscriber_catches_up_by_replay() -> None:
    pub = KVEventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    index = PrefixIndex()
    feed = KVEventFeed(index)
    try:
        pub.publish([stored(1, 2)])  # nobody listens yet: only the replay ring has these
        pub.publish([stored(3, parent=2)])
        await asyncio.sleep(0.2)
        feed.add("w1", endpoint(pub.endpoint), endpoint(pub.replay_endpoint or ""))
        await asyncio.sleep(0.3)
        pub.publish([stored(4, parent=3)])  # seq 2: gap from 0 -> replay 0..1
        await wait_for(lambda: index.match([1, 2, 3, 4]) == {"w1": 4}, 5)
        stats = feed.stats()["w1"]
        assert stats.gaps == 1 and stats.replays == 1 and stats.replay_failures == 0
        index.check_integrity()
    finally:
        await feed.close()
        pub.close()


async def test_gap_without_replay_drops_the_workers_entries() -> None:
    pub = KVEventPublisher("tcp://127.0.0.1:*", None)
    index = PrefixIndex()
    feed = KVEventFeed(index)
    try:
        pub.publish([stored(1, 2)])
        await asyncio.sleep(0.2)
        feed.add("w1", endpoint(pub.endpoint))
        await asyncio.sleep(0.3)
        pub.publish([stored(3, parent=2)])
        await wait_for(lambda: feed.stats()["w1"].batches == 1, 5)
        assert feed.stats()["w1"].replay_failures == 1
        assert index.match([3]) == {"w1": 1}  # resynced from the new event on
        assert index.match([1, 2]) == {}
    finally:
        await feed.close()
        pub.close()


TOKEN = "worker-token-" + "5" * 30


async def test_a_tokened_publisher_sends_hashes_only_to_holders_of_the_token() -> None:
    """Issue 12 §4: meshd's workers publish over CURVE keyed by their API token and without
    token ids. The feed with the token follows (live and by replay); a subscriber without it,
    or with another token, reads nothing at all."""
    import msgpack
    import zmq
    import zmq.asyncio

    from meshd.curve import curve_keys, secure_client

    pub = KVEventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", curve_token=TOKEN,
                           token_ids=False)
    index = PrefixIndex()
    feed = KVEventFeed(index)
    ctx = zmq.asyncio.Context.instance()
    spies = []
    try:
        pub.publish([stored(1, 2)])  # before anyone subscribes: only the replay ring has it
        for token in ("", "another-token-" + "6" * 30):
            spy = ctx.socket(zmq.SUB)
            spy.setsockopt(zmq.SUBSCRIBE, b"")
            spy.setsockopt(zmq.LINGER, 0)
            if token:
                secure_client(spy, curve_keys(token))
            spy.connect(endpoint(pub.endpoint))
            spies.append(spy)
        replay_spy = ctx.socket(zmq.DEALER)
        replay_spy.setsockopt(zmq.LINGER, 0)
        replay_spy.connect(endpoint(pub.replay_endpoint or ""))
        spies.append(replay_spy)
        feed.add("w1", endpoint(pub.endpoint), endpoint(pub.replay_endpoint or ""), TOKEN)
        await asyncio.sleep(0.5)  # CURVE handshakes
        pub.publish([stored(3, parent=2)])  # seq 1: the feed replays seq 0 with the token
        await wait_for(lambda: index.match([1, 2, 3]) == {"w1": 3}, 5)
        assert feed.stats()["w1"].replays == 1
        # A DEALER whose CURVE handshake the publisher refused has no pipe between its retries,
        # and a blocking send would wait for one forever: send without blocking, and a send
        # with nowhere to go is as good as a refused one.
        with contextlib.suppress(zmq.Again):
            await replay_spy.send_multipart([b"", (0).to_bytes(8, "big")], flags=zmq.NOBLOCK)
        for spy in spies:
            assert await spy.poll(1000) == 0, "a subscriber without the token read events"
        # what the token holder gets: hashes, no token ids
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.LINGER, 0)
        secure_client(sub, curve_keys(TOKEN))
        sub.connect(endpoint(pub.endpoint))
        spies.append(sub)
        await asyncio.sleep(0.5)
        pub.publish([stored(4, parent=3)])
        assert await sub.poll(5000)
        _, _, payload = await sub.recv_multipart()
        (event,) = msgpack.unpackb(payload)["events"]
        assert event["block_hashes"] == [4] and event["token_ids"] == []
    finally:
        for spy in spies:
            spy.close(0)
        await feed.close()
        pub.close()
