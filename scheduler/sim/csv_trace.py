"""Strict generic CSV traces: `timestamp,input_tokens,output_tokens`, one request a row.

    timestamp,input_tokens,output_tokens
    0.000,2048,31
    0.113,1877,12

The header row is required (column names, any order, case-insensitive; extra columns are ignored);
`timestamp` is in seconds (any origin: the loader rebases the first arrival to 0). Blank lines
and lines starting with `#` are skipped. Every bad row raises `ValueError` naming the source,
the 1-based line number and the column: a missing column, a non-number, a negative or non-finite
timestamp, `input_tokens < 1`, `output_tokens < 0` (0 is served as 1 token, as the Mooncake
loader does). Rows need not be sorted; the result is sorted by arrival (stable). No prefix
information: each request gets unique block hashes (`trace.block_hashes`).

`trace.load_csv` is the older lenient loader (optional header, no range checks); this one is
for traces from outside whose mistakes should be reported, not replayed.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from meshd.scheduler.sim.trace import TraceRequest

COLUMNS = ("timestamp", "input_tokens", "output_tokens")


def parse_csv_trace(lines: Iterable[str], source: str = "<csv>", speedup: float = 1.0,
                    limit: int | None = None) -> list[TraceRequest]:
    """Requests from CSV text lines (pure). `speedup` divides the rebased arrival times;
    `limit` keeps the first `limit` rows of the file (in file order)."""
    if not speedup > 0:
        raise ValueError(f"speedup: must be > 0, got {speedup}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit: must be >= 0, got {limit}")
    cols: dict[str, int] | None = None
    out: list[TraceRequest] = []
    for lineno, row in enumerate(csv.reader(lines), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if cols is None:
            cols = _header(row, source, lineno)
            continue
        if limit is not None and len(out) >= limit:
            break
        out.append(_request(row, cols, f"{source}:{lineno}", len(out)))
    if cols is None:
        raise ValueError(f"{source}: empty trace, expected a header {','.join(COLUMNS)}")
    t0 = min((r.arrival_s for r in out), default=0.0)
    out = [TraceRequest(r.request_id, (r.arrival_s - t0) / speedup, r.input_tokens,
                        r.output_tokens) for r in out]
    out.sort(key=lambda r: r.arrival_s)
    return out


def load_csv_trace(path: str | Path, speedup: float = 1.0,
                   limit: int | None = None) -> list[TraceRequest]:
    """`parse_csv_trace` over a file; errors name `path:line`."""
    p = Path(path)
    with p.open(newline="") as f:
        return parse_csv_trace(f, str(p), speedup, limit)


def write_csv_trace(path: str | Path, requests: Sequence[TraceRequest]) -> None:
    """Write `requests` in this format (timestamps with microsecond resolution)."""
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in requests:
            w.writerow((f"{r.arrival_s:.6f}", r.input_tokens, r.output_tokens))


def _header(row: list[str], source: str, lineno: int) -> dict[str, int]:
    names = [c.strip().lower() for c in row]
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{source}:{lineno}: header must name {','.join(COLUMNS)}; missing "
                         f"{','.join(missing)} (got {','.join(row)!r})")
    return {c: names.index(c) for c in COLUMNS}


def _request(row: list[str], cols: dict[str, int], where: str, i: int) -> TraceRequest:
    if len(row) <= max(cols.values()):
        raise ValueError(f"{where}: expected {len(cols)} columns "
                         f"({','.join(COLUMNS)}), got {len(row)}")
    t = _number(row[cols["timestamp"]], where, "timestamp")
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"{where}: timestamp: must be a finite number >= 0, got {t}")
    n_in = _integer(row[cols["input_tokens"]], where, "input_tokens")
    if n_in < 1:
        raise ValueError(f"{where}: input_tokens: must be >= 1, got {n_in}")
    n_out = _integer(row[cols["output_tokens"]], where, "output_tokens")
    if n_out < 0:
        raise ValueError(f"{where}: output_tokens: must be >= 0, got {n_out}")
    return TraceRequest(f"c{i}", t, n_in, max(1, n_out))


def _number(text: str, where: str, column: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{where}: {column}: expected a number, got {text.strip()!r}") from None


def _integer(text: str, where: str, column: str) -> int:
    value = _number(text, where, column)
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"{where}: {column}: expected an integer, got {text.strip()!r}")
    return int(value)
