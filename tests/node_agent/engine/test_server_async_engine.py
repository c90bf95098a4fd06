"""The asyncio driver, leases and worker config in-process (no HTTP), on the small model."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import pytest

from meshd.node_agent.engine.async_engine import AsyncEngine, Hooks
from meshd.node_agent.engine.disagg import EngineLeases
from meshd.node_agent.engine.worker_config import add_serve_flags, from_args

from .engine_helpers import generate, make_engine, make_prompt, make_request


async def collect(driver: AsyncEngine, req: object) -> list[int]:
    return [t async for o in driver.generate(req) for t in o.new_token_ids]  # type: ignore


def test_concurrent_requests_match_the_sync_engine() -> None:
    reqs = [make_request(f"r{i}", make_prompt(10 + 3 * i, i), max_tokens=6) for i in range(5)]
    expected = generate(make_engine(), reqs)

    async def run() -> list[list[int]]:
        driver = AsyncEngine(make_engine())
        driver.start()
        try:
            return list(await asyncio.gather(*(collect(driver, r) for r in reqs)))
        finally:
            await driver.shutdown()

    assert asyncio.run(run()) == [expected[r.request_id] for r in reqs]


def test_cancel_aborts_and_frees_blocks_and_idle_does_not_spin() -> None:
    async def run() -> None:
        engine = make_engine()
        driver = AsyncEngine(engine)
        driver.start()
        req = make_request("long", make_prompt(12), max_tokens=400)
        gen = driver.generate(req)
        await anext(gen)
        await gen.aclose()  # the client went away
        for _ in range(200):
            if driver.stats.aborts == 1 and not engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        assert driver.stats.aborts == 1
        assert driver.run_locked(lambda e: e.blocks.num_free_blocks) == engine.config.num_blocks
        driver.run_locked(lambda e: e.blocks.check_integrity())
        cpu = time.process_time()
        await asyncio.sleep(0.5)
        assert time.process_time() - cpu < 0.2, "idle step thread must wait, not spin"
        with pytest.raises(ValueError, match="prompt"):
            await collect(driver, make_request("bad", make_prompt(600), max_tokens=1))
        await driver.shutdown()

    asyncio.run(run())


def test_leases_expire_renew_and_release() -> None:
    now = [0.0]
    engine = make_engine()
    leases: EngineLeases
    driver = AsyncEngine(engine, Hooks(on_held=lambda r, b: leases.grant(r, b),
                                       on_aborted=lambda r: leases.forget(r),
                                       housekeeping=lambda e: leases.expire(e)))
    leases = EngineLeases(driver, 2.0, transfer_timeout_s=3.0, clock=lambda: now[0])
    req = make_request("p", make_prompt(9), max_tokens=1)
    req = type(req)(req.request_id, req.prompt_token_ids, req.sampling, True)
    sent = type(req)("s", req.prompt_token_ids, req.sampling, True)

    def held() -> int:
        return driver.run_locked(lambda e: e.stats().num_held)

    async def run() -> None:
        driver.start()
        outs = [o async for o in driver.generate(req)]
        assert outs[-1].held_block_ids is not None
        assert leases.get("p") == outs[-1].held_block_ids
        now[0] = 1.5
        assert leases.table.lookup("p") is not None  # a transfer starts: renewed to 1.5 + 3 + 1
        now[0] = 5.4
        await asyncio.sleep(0.3)  # housekeeping ticks
        assert len(leases) == 1
        now[0] = 5.6
        for _ in range(100):
            if not len(leases):
                break
            await asyncio.sleep(0.02)
        assert len(leases) == 0 and leases.stats().expired == 1
        assert held() == 0
        assert leases.table.lookup("p") is None
        # A confirmed pull (a transport thread) frees the blocks at once, through the lock.
        [o async for o in driver.generate(sent)]
        assert held() == 1
        await asyncio.to_thread(leases.table.on_sent, "s")
        assert held() == 0 and len(leases) == 0
        s = leases.stats()
        assert (s.granted, s.sent, s.expired) == (2, 1, 1)
        await driver.shutdown()

    asyncio.run(run())


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_serve_flags(p)
    return p.parse_args(list(argv))


def test_worker_config_flags_and_validation(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef-secret\n")
    cfg = from_args(parse("--role", "prefill", "--kv-secret-file", str(secret), "--kv-transfer",
                          "shm", "--lease-timeout-s", "5"))
    assert (cfg.role, cfg.kv_transfer, cfg.kv_secret) == ("prefill", "shm",
                                                          b"0123456789abcdef-secret")
    with pytest.raises(ValueError, match="--kv-secret"):
        from_args(parse("--role", "decode"))
    with pytest.raises(ValueError, match="--kv-replay-port"):
        from_args(parse("--kv-replay-port", "5558"))
    from meshd.cli import _parser

    args = _parser().parse_args(["engine", "serve", "--port", "0", "--moe"])
    assert (args.command, args.action, args.moe) == ("engine", "serve", True)
