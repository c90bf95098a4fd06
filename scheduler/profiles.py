"""Building profiles and selectors from config data, and the built-in named configurations.

A profile config is plain data (from the TOML/YAML config file):
    {"filters": ["health", {"type": "role", "role": "decode"}],
     "scorers": [{"type": "prefix", "weight": 2.0}, {"type": "load", "weight": 1.0}],
     "picker": {"type": "max"}}
A selector config is either a profile config or `{"selector": "approx_tree", ...params}`.
Plugins are created through registries (targets imported lazily); unknown names list the valid.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshd.scheduler.policy import Profile, Registry, Selector
from meshd.scheduler.types import Filter, Picker, Scorer

FILTERS: Registry[Filter] = Registry("filter")
SCORERS: Registry[Scorer] = Registry("scorer")
PICKERS: Registry[Picker] = Registry("picker")
SELECTORS: Registry[Selector] = Registry("selector")

_M = "meshd.scheduler."
for _name, _target in {"health": "filters:HealthFilter", "model": "filters:ModelFilter",
                       "role": "filters:RoleFilter"}.items():
    FILTERS.register(_name, _M + _target)
_SCORER_TARGETS = {"prefix": "scorers:PrefixScorer", "load": "scorers:LoadScorer",
                   "slo": "scorers:SLOScorer", "expert": "scorers:ExpertAffinityScorer"}
for _name, _target in _SCORER_TARGETS.items():
    SCORERS.register(_name, _M + _target)
for _name, _target in {"max": "pickers:MaxScorePicker", "p2c": "pickers:PowerOfTwoPicker",
                       "round_robin": "pickers:RoundRobinPicker"}.items():
    PICKERS.register(_name, _M + _target)
SELECTORS.register("approx_tree", _M + "baselines:ApproxTreeSelector")


def build_profile(config: Mapping[str, Any], name: str = "profile") -> Profile:
    """A `Profile` from config data; raises `ValueError` naming the bad entry."""
    unknown = set(config) - {"filters", "scorers", "picker", "name"}
    if unknown:
        raise ValueError(f"profile {name}: unknown keys {sorted(unknown)}")
    filters = [FILTERS.create(f) for f in config.get("filters", [])]
    scorers: list[tuple[Scorer, float]] = []
    for spec in config.get("scorers", []):
        spec = {"type": spec} if isinstance(spec, str) else spec
        weight = spec.get("weight", 1.0)
        if not isinstance(weight, int | float) or weight < 0:
            raise ValueError(f"profile {name}: scorer {spec.get('type')}: weight must be >= 0")
        scorers.append((SCORERS.create(spec), float(weight)))
    picker = PICKERS.create(config.get("picker", "max"))
    return Profile(str(config.get("name", name)), filters, scorers, picker)


def build_selector(config: Mapping[str, Any], name: str = "selector") -> Selector:
    if "selector" in config:
        params = {k: v for k, v in config.items() if k != "selector"}
        return SELECTORS.create({"type": config["selector"], **params})
    return build_profile(config, name)


def _pool(role: str) -> list[Any]:
    return ["health", "model", {"type": "role", "role": role}]


# meshd's load term: half of it is queued prefill tokens (non-saturating, 1/2 at one 8k-token
# iteration's worth), so long prompts spread by work, not by request count. `least_loaded`
# keeps the count-only scorer: it is the baseline of a request-counting balancer.
_LOAD: dict[str, Any] = {"type": "load", "weight": 1.0, "tokens_weight": 1.0,
                         "tokens_scale": 8192}

BUILTIN: dict[str, dict[str, Any]] = {
    "prefill": {"filters": _pool("prefill"),
                "scorers": [{"type": "prefix", "weight": 2.0}, dict(_LOAD),
                            {"type": "slo", "weight": 1.0, "phase": "prefill"}],
                "picker": "max"},
    "decode": {"filters": _pool("decode"),
               "scorers": [{"type": "prefix", "weight": 2.0}, dict(_LOAD),
                           {"type": "slo", "weight": 1.0, "phase": "decode"},
                           {"type": "expert", "weight": 1.0}],
               "picker": "max"},
    "round_robin": {"filters": _pool("decode"), "scorers": [], "picker": "round_robin"},
    "least_loaded": {"filters": _pool("decode"), "scorers": [{"type": "load"}],
                     "picker": "max"},
    "random_p2c": {"filters": _pool("decode"), "scorers": [{"type": "load"}],
                   "picker": {"type": "p2c", "seed": 0}},
    "approx_tree": {"selector": "approx_tree"},
}


def builtin(name: str) -> Selector:
    """A fresh selector for a built-in named configuration."""
    if name not in BUILTIN:
        raise ValueError(f"unknown profile {name!r}; valid: {', '.join(sorted(BUILTIN))}")
    return build_selector(BUILTIN[name], name)
