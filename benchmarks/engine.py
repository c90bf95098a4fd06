"""Embedded-engine benchmark: prefill and decode throughput, prefix-cache speedup.

    python benchmarks/engine.py [--quick]

Runs on the default tiny model (CPU), prints a table and writes `benchmarks/results/engine.json`
as `{"meta": ..., "compute": {...}, <section>: ...}`. Other sections (e.g. KV-transfer
throughput) plug in with `register_section("transfer", fn)` where `fn(engine_config) -> dict`;
each section's rows are `{"name": str, **figures}` and are printed the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from meshd.node_agent.engine.api import EngineRequest, SamplingParams
from meshd.node_agent.engine.config import EngineConfig
from meshd.node_agent.engine.engine import Engine

Row = dict[str, Any]
SECTIONS: dict[str, Callable[[EngineConfig], list[Row]]] = {}
RESULTS = Path(__file__).parent / "results" / "engine.json"


def register_section(name: str, fn: Callable[[EngineConfig], list[Row]]) -> None:
    """Add a section of rows computed by `fn(config)` to the report (name must be new)."""
    if name in SECTIONS:
        raise ValueError(f"section {name!r} already registered")
    SECTIONS[name] = fn


def _prompt(n: int, salt: int) -> tuple[int, ...]:
    return tuple((salt * 131 + i * 7) % 256 for i in range(n))


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _drain(engine: Engine) -> None:
    while engine.has_unfinished():
        engine.step()


REPEATS = 2  # best of: the machine is shared, the minimum is the least disturbed run


def _prefill_once(cfg: EngineConfig, b: int, prompt_len: int) -> float:
    engine = Engine(cfg)
    for i in range(b):
        engine.add_request(EngineRequest(f"p{i}", _prompt(prompt_len, i), _params(1)))
    t0 = time.perf_counter()
    _drain(engine)
    return time.perf_counter() - t0


def _decode_once(cfg: EngineConfig, b: int, new_tokens: int) -> float:
    engine = Engine(cfg)
    for i in range(b):
        engine.add_request(EngineRequest(f"d{i}", _prompt(16, i), _params(new_tokens + 1)))
    first = 0
    while first < b:  # prefill and the first token of every request, not timed
        first += sum(1 for o in engine.step() if o.num_output_tokens == 1)
    t0 = time.perf_counter()
    _drain(engine)
    return time.perf_counter() - t0


def prefill_rows(cfg: EngineConfig, batches: tuple[int, ...], prompt_len: int) -> list[Row]:
    rows = []
    for b in batches:
        dt = min(_prefill_once(cfg, b, prompt_len) for _ in range(REPEATS))
        rows.append({"name": f"prefill b={b}", "batch": b, "prompt_len": prompt_len,
                     "seconds": dt, "tokens_per_s": b * prompt_len / dt})
    return rows


def decode_rows(cfg: EngineConfig, batches: tuple[int, ...], new_tokens: int) -> list[Row]:
    rows = []
    for b in batches:
        dt = min(_decode_once(cfg, b, new_tokens) for _ in range(REPEATS))
        rows.append({"name": f"decode b={b}", "batch": b, "seconds": dt,
                     "tokens_per_s": b * new_tokens / dt,
                     "step_ms": 1000 * dt / new_tokens})
    return rows


def prefix_rows(cfg: EngineConfig, prefix_len: int, suffix_len: int) -> list[Row]:
    """Time to first token for a prompt whose prefix is cold vs cached."""
    engine = Engine(cfg)
    shared = _prompt(prefix_len, 99)

    def ttft(rid: str, salt: int) -> tuple[float, int]:
        engine.add_request(EngineRequest(rid, shared + _prompt(suffix_len, salt), _params(1)))
        before = engine.stats().forwarded_tokens
        t0 = time.perf_counter()
        _drain(engine)
        return time.perf_counter() - t0, engine.stats().forwarded_tokens - before

    cold, cold_fwd = ttft("cold", 1)
    warm, warm_fwd = ttft("warm", 2)
    return [{"name": f"prefix {prefix_len}+{suffix_len} cold", "ttft_ms": 1000 * cold,
             "forwarded_tokens": cold_fwd},
            {"name": f"prefix {prefix_len}+{suffix_len} hit", "ttft_ms": 1000 * warm,
             "forwarded_tokens": warm_fwd, "speedup": cold / warm}]


def compute_rows(cfg: EngineConfig, quick: bool) -> list[Row]:
    batches = (1, 8) if quick else (1, 8, 32)
    cfg_nocache = EngineConfig(**{**_fields(cfg), "enable_prefix_caching": False})
    return (prefill_rows(cfg_nocache, batches, 64 if quick else 256)
            + decode_rows(cfg_nocache, batches, 8 if quick else 32)
            + prefix_rows(cfg, 256 if quick else 1024, 16))


def _fields(cfg: EngineConfig) -> dict[str, Any]:
    return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}


def _print(section: str, rows: list[Row]) -> None:
    print(f"\n[{section}]")
    for r in rows:
        figs = "  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in r.items() if k != "name")
        print(f"  {r['name']:<28} {figs}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    cfg = EngineConfig(num_blocks=1024, max_num_batched_tokens=2048, max_num_seqs=64)
    report: dict[str, Any] = {"meta": {
        "model": cfg.model.name, "dtype": cfg.dtype, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "machine": platform.machine(), "quick": args.quick}}
    _prefill_once(cfg, 4, 32)  # warm up kernels and allocator
    report["compute"] = compute_rows(cfg, args.quick)
    _print("compute", report["compute"])
    for name, fn in SECTIONS.items():
        report[name] = fn(cfg)
        _print(name, report[name])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return report


# -- transfer section: KV pulls between two engines' real cache tensors -----------------------
TRANSFER_SECRET = b"benchmark-secret-0123456789abcdef"


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def transfer_rows(cfg: EngineConfig, num_blocks: int = 256, repeats: int = 3) -> list[Row]:
    """GB/s (1e9 B/s) pulling `num_blocks` blocks from one engine's KV tensors into another's
    over tcp and shm (server threads in this process, loopback), next to a torch copy of the
    same blocks. The source cache is filled with random values first."""
    from meshd.kv_transfer.auth import SharedSecretAuthenticator
    from meshd.kv_transfer.testing import DictSource
    from meshd.kv_transfer.transport import make_client, make_server
    from meshd.node_agent.engine.disagg import block_layout

    src, dst = Engine(cfg), Engine(cfg)
    for t in src.kv_caches:
        t.normal_()
    for t in dst.kv_caches:
        t.zero_()  # fault the pages in
    layout = block_layout(src.layout)
    n = min(num_blocks, cfg.num_blocks)
    ids = list(range(n))
    nbytes = n * layout.bytes_per_block
    auth = SharedSecretAuthenticator(TRANSFER_SECRET, "bench")

    def copy_blocks() -> None:
        for s_t, d_t in zip(src.kv_caches, dst.kv_caches, strict=True):
            d_t[:, :n].copy_(s_t[:, :n])

    memcpy = nbytes / _best_seconds(copy_blocks, max(repeats, 10)) / 1e9  # cheap: more tries
    rows: list[Row] = [{"name": f"memcpy {n} blocks", "mib": nbytes / 2**20, "gbps": memcpy}]
    for name in ("tcp", "shm"):
        source = DictSource({f"r{i}": ids for i in range(repeats + 1)})
        server = make_server(name, src.kv_caches, layout, auth, source)
        client = make_client(name, dst.kv_caches, layout, auth)
        it = iter(range(repeats + 1))

        def pull(server: Any = server, client: Any = client, it: Any = it) -> None:
            res = client.fetch(server.address, f"r{next(it)}", ids, ids, 60.0)
            assert res.ok, res.error

        pull()  # warm up (connection paths, page faults)
        secs = _best_seconds(pull, repeats)
        client.close()
        server.close()
        assert all(torch.equal(a[:, :n], b[:, :n]) for a, b in zip(src.kv_caches,
                                                                    dst.kv_caches, strict=True))
        gbps = nbytes / secs / 1e9
        rows.append({"name": f"{name} {n} blocks", "mib": nbytes / 2**20, "gbps": gbps,
                     "vs_memcpy": gbps / memcpy, "ms": 1000 * secs})
    return rows


register_section("transfer", transfer_rows)


if __name__ == "__main__":
    main()
