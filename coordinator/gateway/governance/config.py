"""`[gateway.governance]`: tenant policy, prices, the fleet cap, and how admission runs.

The *policy* (tenants, defaults, prices, fleet) may also live in `policy_file`, a TOML file of
the same tables that the gateway re-reads when it changes (every `reload_interval_s`); the
file's tables replace the inline ones. A bad policy stops start-up with a message naming the
field; a bad reload keeps the policy in force, logs and counts the error.

    [gateway.governance]
    default_tenant = "local"          # requests without an API key (no auth configured)
    [gateway.governance.defaults]     # policy of tenants without their own table
    rpm = 600
    [gateway.governance.tenants.acme]
    api_keys = ["sk-acme-..."]        # besides gateway.api_keys
    models = ["tiny"]; tpm = 100000; daily_budget_usd = 20.0; priority = "high"
    [gateway.governance.prices.tiny]  # USD per 1M tokens ("*": every other model)
    input = 0.5; cached_input = 0.05; output = 1.5
    [gateway.governance.fleet]
    tokens_per_s = 5000; spend_per_hour_usd = 50.0
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshd.coordinator.gateway.privacy.config import ACTIONS as PRIVACY_ACTIONS
from meshd.coordinator.gateway.privacy.config import check_classes
from meshd.scheduler.admission.fair import FairConfig
from meshd.scheduler.admission.loops import ACTIONS, LoopConfig
from meshd.scheduler.admission.prices import EstimateConfig, Price

PRIORITIES = {"high": 0, "normal": 1, "low": 2}
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_POLICY_TABLES = ("tenants", "defaults", "prices", "fleet")


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """One tenant's limits; 0 means no limit. Token limits count prompt + completion tokens
    (`input_tpm` / `output_tpm` one side); budgets are in USD, priced by the price table."""

    models: tuple[str, ...] = ()  # allowed models; empty: every model
    rpm: int = 0
    tpm: int = 0
    input_tpm: int = 0
    output_tpm: int = 0
    max_concurrent: int = 0  # requests in flight across the fleet
    max_tokens: int = 0  # cap on a request's max_tokens
    daily_tokens: int = 0
    monthly_tokens: int = 0
    daily_budget_usd: float = 0.0
    monthly_budget_usd: float = 0.0
    priority: str = "normal"  # high | normal | low: fair share serves higher classes first
    weight: float = 1.0  # fair share within a class
    admin: bool = False  # may read every tenant's usage
    api_keys: tuple[str, ...] = ()
    loop_action: str = ""  # overrides loops.action ("" keeps it)
    # privacy routing (`[gateway.privacy]`): the node classes its sensitive requests may use
    # (() keeps sensitive_classes), what a sensitive one no eligible node serves gets ("" keeps
    # the action), and whether every request of the tenant counts as sensitive
    privacy_classes: tuple[str, ...] = ()
    privacy_action: str = ""
    privacy_always: bool = False
    # halt a choice once its rolling confidence drops below this (0: [gateway.confidence]'s)
    confidence_halt_below: float = 0.0
    # every completion carries a signed receipt (a request's x-meshd-receipt overrides it)
    receipts: bool = False

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "input_tpm", "output_tpm", "max_concurrent", "max_tokens",
                     "daily_tokens", "monthly_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0")
        for name in ("daily_budget_usd", "monthly_budget_usd"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be >= 0")
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority: must be one of {', '.join(PRIORITIES)}, got "
                             f"{self.priority!r}")
        if not self.weight > 0:
            raise ValueError(f"weight: must be > 0, got {self.weight}")
        if self.loop_action and self.loop_action not in ACTIONS:
            raise ValueError(f"loop_action: must be one of {', '.join(ACTIONS)}, got "
                             f"{self.loop_action!r}")
        for key in self.api_keys:
            if len(key) < 8:
                raise ValueError("api_keys: keys need >= 8 characters")
        check_classes(self.privacy_classes, "privacy_classes")
        if not 0.0 <= self.confidence_halt_below < 1.0:
            raise ValueError(f"confidence_halt_below: must be in [0, 1), got "
                             f"{self.confidence_halt_below!r}")
        if self.privacy_action and self.privacy_action not in PRIVACY_ACTIONS:
            raise ValueError(f"privacy_action: must be refuse or mask, got "
                             f"{self.privacy_action!r}")

    @property
    def priority_class(self) -> int:
        return PRIORITIES[self.priority]


@dataclass(frozen=True, slots=True)
class FleetPolicy:
    """Caps across every tenant: tokens per second averaged over `window_s`, spend per hour."""

    tokens_per_s: float = 0.0
    window_s: float = 10.0
    spend_per_hour_usd: float = 0.0

    def __post_init__(self) -> None:
        if self.tokens_per_s < 0 or self.spend_per_hour_usd < 0:
            raise ValueError("tokens_per_s and spend_per_hour_usd: must be >= 0")
        if not 1 <= self.window_s <= 3600:
            raise ValueError(f"window_s: must be in 1..3600, got {self.window_s}")


@dataclass(frozen=True, slots=True)
class Policy:
    """The reloadable part, validated."""

    tenants: dict[str, TenantPolicy]
    defaults: TenantPolicy
    prices: dict[str, Price]
    fleet: FleetPolicy

    def of(self, tenant: str) -> TenantPolicy:
        return self.tenants.get(tenant, self.defaults)

    def keys(self) -> dict[str, str]:
        """API key -> tenant, from the tenants' `api_keys`."""
        return {k: t for t, p in self.tenants.items() for k in p.api_keys}


@dataclass(frozen=True, slots=True)
class LedgerSettings:
    """How this replica uses the fleet ledger: it syncs every `sync_interval_s`; a lease tops
    up to `lease_fraction` of a limit and lives `lease_ttl_s` past its last sync; a reservation
    that needs the ledger waits at most `timeout_s`. `fail_mode` says what a request needing a
    limit gets while the ledger is unreachable past the leases: closed (503) or open (served,
    counted, reported when the ledger is back)."""

    sync_interval_s: float = 0.5
    lease_ttl_s: float = 10.0
    lease_fraction: float = 0.1
    timeout_s: float = 2.0
    fail_mode: str = "closed"

    def __post_init__(self) -> None:
        for name in ("sync_interval_s", "lease_ttl_s", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"gateway.governance.ledger.{name}: must be > 0")
        if not 0 < self.lease_fraction <= 1:
            raise ValueError("gateway.governance.ledger.lease_fraction: must be in (0, 1]")
        if self.fail_mode not in ("closed", "open"):
            raise ValueError(f"gateway.governance.ledger.fail_mode: must be closed or open, "
                             f"got {self.fail_mode!r}")
        if self.lease_ttl_s <= 4 * self.sync_interval_s:
            raise ValueError("gateway.governance.ledger.lease_ttl_s: must exceed 4 x "
                             "sync_interval_s")


@dataclass(frozen=True, slots=True)
class GovernanceConfig:
    default_tenant: str = "default"
    policy_file: str = ""
    reload_interval_s: float = 2.0
    tenants: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    prices: dict[str, Any] = field(default_factory=dict)
    fleet: dict[str, Any] = field(default_factory=dict)
    fair: FairConfig = field(default_factory=FairConfig)
    loops: LoopConfig = field(default_factory=LoopConfig)
    ledger: LedgerSettings = field(default_factory=LedgerSettings)
    estimate: EstimateConfig = field(default_factory=EstimateConfig)

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.default_tenant) or self.default_tenant == "fleet":
            raise ValueError("gateway.governance.default_tenant: 1-64 of A-Z a-z 0-9 . _ - "
                             "and not 'fleet'")
        if not self.reload_interval_s > 0:
            raise ValueError("gateway.governance.reload_interval_s: must be > 0")
        self.policy()  # validates (and reads policy_file)

    def policy(self) -> Policy:
        """The policy in force: the inline tables, replaced by `policy_file`'s. Raises
        ValueError naming the field (and the file)."""
        tables = {"tenants": self.tenants, "defaults": self.defaults, "prices": self.prices,
                  "fleet": self.fleet}
        where = "gateway.governance."
        if self.policy_file:
            tables.update(read_policy_file(self.policy_file))
            where = f"{self.policy_file}: "
        return build_policy(tables, where)


def read_policy_file(path: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(Path(path).expanduser().read_text())
    except OSError as e:
        raise ValueError(f"gateway.governance.policy_file: cannot read {path}: "
                         f"{e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"gateway.governance.policy_file: {path}: {e}") from None
    unknown = sorted(set(data) - set(_POLICY_TABLES))
    if unknown:
        raise ValueError(f"{path}: {unknown[0]}: unknown table (valid: "
                         f"{', '.join(_POLICY_TABLES)})")
    return data


def build_policy(tables: dict[str, Any], where: str) -> Policy:
    from meshd.config import build  # the loader's coercion and field naming

    def table(v: Any, name: str) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise ValueError(f"{where}{name}: must be a table")
        return v

    for t in table(tables.get("tenants", {}), "tenants"):
        if not _NAME.fullmatch(t) or t == "fleet":
            raise ValueError(f"{where}tenants.{t}: a tenant name is 1-64 of A-Z a-z 0-9 . _ - "
                             "and not 'fleet'")
    tenants = {t: build(TenantPolicy, table(v, f"tenants.{t}"), f"{where}tenants.{t}.")
               for t, v in table(tables.get("tenants", {}), "tenants").items()}
    defaults = build(TenantPolicy, table(tables.get("defaults", {}), "defaults"),
                     f"{where}defaults.")
    if defaults.api_keys or defaults.admin:
        raise ValueError(f"{where}defaults: api_keys and admin belong to a named tenant")
    prices = {m: build(Price, table(v, f"prices.{m}"), f"{where}prices.{m}.")
              for m, v in table(tables.get("prices", {}), "prices").items()}
    for m, price in prices.items():
        if min(price.input, price.cached_input, price.output) < 0:
            raise ValueError(f"{where}prices.{m}: prices must be >= 0")
    fleet = build(FleetPolicy, table(tables.get("fleet", {}), "fleet"), f"{where}fleet.")
    seen: dict[str, str] = {}
    for t, tp in tenants.items():
        for key in tp.api_keys:
            if key in seen:
                raise ValueError(f"{where}tenants.{t}.api_keys: a key of tenant {seen[key]!r} "
                                 "too")
            seen[key] = t
    return Policy(tenants, defaults, prices, fleet)
