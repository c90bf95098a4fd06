"""The named routing policies the comparison runs, each built from the scheduler's real code.

Every policy is a `meshd.scheduler.router.Router` over built-in profiles/selectors; `build`
returns it with the `PrefixIndex` the simulator must feed (None for policies that read no index:
round-robin, least-loaded and the SGLang-like approximate tree, which learns only from its own
routing decisions).
"""

from __future__ import annotations

from meshd.scheduler.pd import PDDecider
from meshd.scheduler.prefix_index import PrefixIndex
from meshd.scheduler.profiles import builtin
from meshd.scheduler.router import Router

POLICIES = ("round_robin", "least_loaded", "approx_tree", "meshd")


def build(name: str) -> tuple[Router, PrefixIndex | None]:
    """A fresh router for `name` (one of `POLICIES`) and the index it reads."""
    if name in ("round_robin", "least_loaded", "approx_tree"):
        return Router(decode=builtin(name)), None
    if name == "meshd":
        index = PrefixIndex()
        return Router(decode=builtin("decode"), prefill=builtin("prefill"), pd=PDDecider(),
                      index=index), index
    if name == "meshd_colocated":
        index = PrefixIndex()
        return Router(decode=builtin("decode"), index=index), index
    raise ValueError(f"unknown policy {name!r}; valid: {', '.join(POLICIES)}, meshd_colocated")
