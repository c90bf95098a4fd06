"""Workload traces for the simulator: Mooncake FAST'25 JSONL and a generic CSV.

A trace is a list of `TraceRequest`s sorted by arrival. Loaders scale time (`speedup`: arrival
times are divided by it, so 2.0 replays the trace at twice the recorded rate) and cut the trace
(`limit` requests from `start`), so that one file sweeps load and a quick run stays quick.

Prefix model: Mooncake's `hash_ids` name one 512-token block each; equal ids at equal positions
mean an equal prefix. `block_hashes()` turns them into the chained per-block hashes a
`RequestView` carries, at a configurable engine block size that divides 512: 512 models the cache
at trace granularity (only full 512-token blocks can hit); 16 (vLLM on CUDA) expands every trace
block into 32 engine blocks, and the partial last block into its full 16-token blocks.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

TRACE_BLOCK_TOKENS = 512
_MASK = (1 << 61) - 1


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace; `hash_ids` is empty where the trace has no prefix information.
    `experts` (MoE traces, `sim.moe`): (expert id, prompt tokens routed to it) pairs, the
    statistics a live prefill answer carries; empty for dense models."""

    request_id: str
    arrival_s: float
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()
    experts: tuple[tuple[int, int], ...] = ()


def _chain(parent: int, value: int) -> int:
    """Deterministic chained block hash (independent of PYTHONHASHSEED)."""
    return ((parent * 1_000_003) ^ (value * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019)) & _MASK


def block_hashes(req: TraceRequest, block_size: int = TRACE_BLOCK_TOKENS) -> tuple[int, ...]:
    """Chained hashes of the request's full `block_size`-token prompt blocks.

    `block_size` must divide 512. A request without `hash_ids` has no shareable blocks: it gets
    hashes derived from its id, so they never match another request's.
    """
    if block_size <= 0 or TRACE_BLOCK_TOKENS % block_size:
        raise ValueError(f"block_size: must divide {TRACE_BLOCK_TOKENS}, got {block_size}")
    n_full = req.input_tokens // block_size
    per = TRACE_BLOCK_TOKENS // block_size
    ids: Iterable[int] = req.hash_ids
    if not req.hash_ids:
        digest = hashlib.blake2b(req.request_id.encode(), digest_size=7).digest()
        salt = int.from_bytes(digest, "little") << 8
        ids = (salt + i for i in range((n_full + per - 1) // per))
    out: list[int] = []
    parent = 0
    for hid in ids:
        for j in range(per):
            if len(out) == n_full:
                return tuple(out)
            parent = _chain(parent, hid * per + j)
            out.append(parent)
    return tuple(out)


def _cut(rows: Iterable[TraceRequest], speedup: float, limit: int | None,
         start: int) -> list[TraceRequest]:
    if speedup <= 0:
        raise ValueError(f"speedup: must be > 0, got {speedup}")
    if start < 0 or (limit is not None and limit < 0):
        raise ValueError("start/limit: must be >= 0")
    kept: list[TraceRequest] = []
    for i, r in enumerate(rows):
        if i < start:
            continue
        if limit is not None and len(kept) >= limit:
            break
        kept.append(r)
    t0 = min((r.arrival_s for r in kept), default=0.0)
    out = [TraceRequest(r.request_id, (r.arrival_s - t0) / speedup, r.input_tokens,
                        r.output_tokens, r.hash_ids) for r in kept]
    out.sort(key=lambda r: r.arrival_s)
    return out


def _mooncake_rows(path: Path) -> Iterator[TraceRequest]:
    with path.open() as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            d = json.loads(line)
            yield TraceRequest(f"r{i}", float(d["timestamp"]) / 1000.0, int(d["input_length"]),
                               max(1, int(d["output_length"])),
                               tuple(int(h) for h in d.get("hash_ids", ())))


def load_mooncake(path: str | Path, speedup: float = 1.0, limit: int | None = None,
                  start: int = 0) -> list[TraceRequest]:
    """Mooncake JSONL: `timestamp` (ms), `input_length`, `output_length`, `hash_ids`."""
    return _cut(_mooncake_rows(Path(path)), speedup, limit, start)


def _csv_rows(path: Path) -> Iterator[TraceRequest]:
    with path.open(newline="") as f:
        reader = csv.reader(f)
        for i, row in enumerate(reader):
            if not row or row[0].strip().startswith("#"):
                continue
            try:
                t, n_in, n_out = float(row[0]), int(float(row[1])), int(float(row[2]))
            except ValueError:
                if i == 0:
                    continue  # header
                raise ValueError(f"{path}:{i + 1}: expected timestamp,input,output") from None
            yield TraceRequest(f"r{i}", t, n_in, max(1, n_out))


def load_csv(path: str | Path, speedup: float = 1.0, limit: int | None = None,
             start: int = 0, time_unit_s: float = 1.0) -> list[TraceRequest]:
    """Generic CSV `timestamp,input_tokens,output_tokens` (optional header; no prefix info).

    `time_unit_s` converts the timestamp column to seconds (0.001 for milliseconds).
    """
    rows = (TraceRequest(r.request_id, r.arrival_s * time_unit_s, r.input_tokens,
                         r.output_tokens) for r in _csv_rows(Path(path)))
    return _cut(rows, speedup, limit, start)


def load(path: str | Path, speedup: float = 1.0, limit: int | None = None,
         start: int = 0) -> list[TraceRequest]:
    """Load by extension: `.jsonl` is Mooncake, `.csv` the generic CSV (seconds)."""
    p = Path(path)
    if p.suffix == ".jsonl":
        return load_mooncake(p, speedup, limit, start)
    if p.suffix == ".csv":
        return load_csv(p, speedup, limit, start)
    raise ValueError(f"path: unknown trace format {p.suffix!r} (expected .jsonl or .csv)")


def subsample(trace: Sequence[TraceRequest], fraction: float, seed: int) -> list[TraceRequest]:
    """Each request kept with probability `fraction`, drawn from `random.Random(seed)`."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction: must be in (0, 1], got {fraction}")
    rng = random.Random(seed)
    return [r for r in trace if rng.random() < fraction]
