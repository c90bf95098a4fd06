"""A new gateway replica starts from a sibling's prefix-index snapshot plus the event stream."""

from __future__ import annotations

import asyncio

from support.control import wait_for
from support.net import free_port

from meshd.capabilities import Member, Worker
from meshd.coordinator.gateway.config import GatewayConfig
from meshd.coordinator.gateway.runtime import GatewayRuntime
from meshd.node_agent.engine.kv_publisher import BlockStored, KVEventPublisher


def stored(*hashes: int, parent: int | None = None) -> BlockStored:
    return BlockStored(block_hashes=list(hashes), parent_block_hash=parent,
                       token_ids=list(range(16 * len(hashes))), block_size=16, medium="GPU")


def ep(e: str | None) -> str:
    return (e or "").replace("0.0.0.0", "127.0.0.1")


async def test_new_replica_starts_from_snapshot_then_follows_the_stream() -> None:
    pub = KVEventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", buffer_steps=2)
    worker = Worker("w1", f"http://127.0.0.1:{free_port()}", "both", "m", kv_block_size=16,
                    kv_events_endpoint=ep(pub.endpoint),
                    kv_events_replay_endpoint=ep(pub.replay_endpoint))
    gone = Worker("w-gone", f"http://127.0.0.1:{free_port()}", "both", "m")

    async def members() -> list[Member]:
        return [Member("n1", worker)]

    first = GatewayRuntime(GatewayConfig(port=free_port()), members)
    await first.start()
    second = None
    try:
        await asyncio.sleep(0.3)  # SUB connect
        for i in range(4):  # more batches than the publisher's replay ring keeps (2)
            pub.publish([stored(10 + i, parent=9 + i if i else None)])
        await wait_for(lambda: first.index.match([10, 11, 12, 13]) == {"w1": 4}, 5)
        first.index.add_worker(gone.worker_id)  # stale entry: must not survive into the copy
        snap = first.index_snapshot()

        second = GatewayRuntime(GatewayConfig(port=free_port()), members, snap)
        await second.start()
        # Known at once, although the ring no longer holds batches 0-1 to replay.
        assert second.index.match([10, 11, 12, 13]) == {"w1": 4}
        assert gone.worker_id not in second.index.workers()
        await asyncio.sleep(0.3)
        pub.publish([stored(14, parent=13)])  # and the stream goes on from the snapshot's seq
        await wait_for(lambda: second.index.match([10, 11, 12, 13, 14]) == {"w1": 5}, 5)
        second.index.check_integrity()
    finally:
        if second is not None:
            await second.stop(1)
        await first.stop(1)
        pub.close()
