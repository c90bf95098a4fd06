"""From the split the workers run to the split a plan chose: the fewest role changes.

`role_moves(workers, target)` takes each worker's (id, role) and a target (prefill, decode,
colocated) count and returns the (worker id, new role) changes that reach it, moving as few
workers as possible (each change drains and restarts a worker: its cache goes cold). Workers
that keep their role are never touched; among the ones that must move, the order of `workers`
decides (callers pass them sorted, so the choice is deterministic). Pure.
"""

from __future__ import annotations

from collections.abc import Sequence

ROLES = ("prefill", "decode", "both")


def role_moves(workers: Sequence[tuple[str, str]], target: tuple[int, int, int]
               ) -> list[tuple[str, str]]:
    """ValueError when the target does not count exactly these workers."""
    if sum(target) != len(workers) or min(target) < 0:
        raise ValueError(f"target {target} must be >= 0 and sum to {len(workers)} workers")
    want = dict(zip(ROLES, target, strict=True))
    have = {r: [w for w, role in workers if role == r] for r in ROLES}
    for wid, role in workers:
        if role not in ROLES:
            raise ValueError(f"worker {wid}: unknown role {role!r}")
    surplus = [w for r in ROLES for w in have[r][want[r]:]]  # beyond what each role keeps
    moves: list[tuple[str, str]] = []
    for r in ROLES:
        for _ in range(max(0, want[r] - len(have[r]))):
            moves.append((surplus.pop(0), r))
    return moves
