"""Prices and the completion estimate: what a request is reserved at before it runs.

`PriceTable` holds per-model prices in USD per million tokens (input, cached input, output;
"*" for models without their own) and prices usage in nano-USD (integers: the ledger's unit),
rounding up. A reservation prices the whole prompt as uncached input (the cached share is
known only once a worker answers); the settlement prices the cached tokens the worker reported
at the cached rate, so a tenant sees what prefix routing saved.

`CompletionEstimate` is the completion length reserved for a request without `max_tokens`: a
running mean per (tenant, model) of what such requests produced, times a headroom factor, or a
configured default until there are observations. `source` says which, so the gateway can be
honest about it (`x-meshd-completion-estimate`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Price:
    input: float = 0.0  # USD per 1M prompt tokens
    cached_input: float = 0.0  # USD per 1M prompt tokens served from the prefix cache
    output: float = 0.0  # USD per 1M completion tokens

    def cost(self, prompt: int, cached: int, completion: int) -> int:
        """nano-USD, rounded up: 1M tokens at 1 USD/M is 1e9 nano-USD, one token 1000."""
        if cached:
            cached = min(max(cached, 0), prompt)
            return math.ceil(((prompt - cached) * self.input + cached * self.cached_input
                              + completion * self.output) * 1000)
        return math.ceil((prompt * self.input + completion * self.output) * 1000)


FREE = Price()


class _Prices(dict[str, Price]):
    """Prices by model; a model without its own gets `default` (and is not added)."""

    __slots__ = ("default",)

    def __init__(self, prices: dict[str, Price]) -> None:
        super().__init__(prices)
        self.default = prices.get("*", FREE)

    def __missing__(self, model: str) -> Price:
        return self.default


class PriceTable:
    def __init__(self, prices: dict[str, Price]) -> None:
        self._prices = _Prices(prices)
        # of(model): its price ("*"'s, else free, for a model without its own); a bound dict
        # lookup, not a method, since it runs twice per request
        self.of: Callable[[str], Price] = self._prices.__getitem__

    def priced(self) -> bool:
        """Whether any model costs anything (spend meters are skipped otherwise)."""
        return any(p != FREE for p in self._prices.values())


@dataclass(frozen=True, slots=True)
class EstimateConfig:
    default_tokens: int = 256  # reserved until a (tenant, model) has observations
    headroom: float = 1.5  # reserve this multiple of the running mean
    alpha: float = 0.1  # weight of each new observation in the running mean

    def __post_init__(self) -> None:
        if self.default_tokens < 1:
            raise ValueError("gateway.governance.estimate.default_tokens: must be >= 1")
        if self.headroom < 1:
            raise ValueError("gateway.governance.estimate.headroom: must be >= 1")
        if not 0 < self.alpha <= 1:
            raise ValueError("gateway.governance.estimate.alpha: must be in (0, 1]")


class CompletionEstimate:
    """Running completion lengths of requests sent without `max_tokens`, per key. Bounded:
    at most `max_keys` keys (the oldest is dropped)."""

    def __init__(self, config: EstimateConfig, max_keys: int = 10_000) -> None:
        self.config = config
        self.max_keys = max_keys
        self._mean: dict[tuple[str, str], float] = {}

    def estimate(self, tenant: str, model: str, cap: int) -> tuple[int, str]:
        """(tokens to reserve, "running" | "default"), at most `cap`."""
        mean = self._mean.get((tenant, model))
        if mean is None:
            return min(self.config.default_tokens, cap), "default"
        return min(max(1, math.ceil(mean * self.config.headroom)), cap), "running"

    def observe(self, tenant: str, model: str, completion_tokens: int) -> None:
        key = (tenant, model)
        mean = self._mean.get(key)
        if mean is None:
            if len(self._mean) >= self.max_keys:
                del self._mean[next(iter(self._mean))]
            self._mean[key] = float(completion_tokens)
        else:
            self._mean[key] = mean + self.config.alpha * (completion_tokens - mean)
