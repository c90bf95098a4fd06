"""The `[gateway]` config tree: one frozen dataclass per section, composed into `GatewayConfig`.

    [gateway]            listening address, replicas, auth, static workers, tokenizers
    [gateway.http]       the client side: sizes and deadlines of connections (`http/`)
    [gateway.deadlines]  the request lifecycle's step deadlines and attempts (`serving/`)
    [gateway.limits]     caps on what a request may ask for, checked before any worker sees it
    [gateway.routing]    profiles, the P/D decider, load scraping (`workers/`, `scheduler/`)
    [gateway.governance] tenants, budgets, prices, fair share, loop breaker (`governance/`)

Each component reads its own section and nothing renames a field on the way. Plain data: no
I/O, nothing heavy imported, so `meshd.config` composes it into the root config. Validation
raises `ValueError` naming the field (`gateway.deadlines.total_s: must be > 0`). Every field is
documented in docs/operations.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshd.coordinator.gateway.governance.config import GovernanceConfig
from meshd.coordinator.gateway.privacy.config import PrivacyConfig
from meshd.coordinator.gateway.records.record import RetentionPolicy
from meshd.coordinator.gateway.serving.confidence import ConfidenceConfig
from meshd.scheduler.pd import PDConfig


def _positive(obj: Any, section: str, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(obj, name)
        if not v > 0:
            raise ValueError(f"gateway.{section}{name}: must be > 0, got {v}")


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """Client connections. Every wait on a client has a deadline: `header_timeout_s` from a
    request's first byte to the end of its headers, `body_timeout_s` for the body after that,
    `keepalive_timeout_s` for an idle connection, `write_timeout_s` for a slow reader to drain
    a stream, `shutdown_timeout_s` for draining in-flight requests. A handler runs at most the
    request deadline (`deadlines.total_s`) plus `handler_grace_s`."""

    reuse_port: bool = True
    backlog: int = 2048
    max_body_bytes: int = 8 << 20
    max_header_bytes: int = 64 << 10
    max_pipelined: int = 16
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_timeout_s: float = 75.0
    write_timeout_s: float = 30.0
    handler_grace_s: float = 5.0
    shutdown_timeout_s: float = 30.0
    sweep_interval_s: float = 0.5

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_pipelined", "backlog"):
            if getattr(self, name) < 1:
                raise ValueError(f"gateway.http.{name}: must be >= 1")
        if self.max_body_bytes < 1024:
            raise ValueError(f"gateway.http.max_body_bytes: must be >= 1024, got "
                             f"{self.max_body_bytes}")
        _positive(self, "http.", ("header_timeout_s", "body_timeout_s", "keepalive_timeout_s",
                                  "write_timeout_s", "handler_grace_s", "shutdown_timeout_s",
                                  "sweep_interval_s"))


@dataclass(frozen=True, slots=True)
class Deadlines:
    """The request lifecycle's limits, in seconds: the whole request, the remote prefill's
    answer, decode's first token (includes the KV pull or a local prefill), the gap between two
    streamed tokens; and how many prefill and decode attempts one choice may make."""

    total_s: float = 300.0
    prefill_s: float = 30.0
    first_token_s: float = 60.0
    inter_token_s: float = 20.0
    max_prefill_attempts: int = 2
    max_decode_attempts: int = 3

    def __post_init__(self) -> None:
        _positive(self, "deadlines.", ("total_s", "prefill_s", "first_token_s",
                                       "inter_token_s", "max_prefill_attempts",
                                       "max_decode_attempts"))


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request may ask for, enforced at the edge before any worker sees it, so a
    worker never rejects what the gateway accepted. Each cap is bounded by what every worker
    accepts: `max_n` by the embedded engine's 128 (vLLM: 16384), `max_tokens` by the engine's
    2^31 (a model's context length is the worker's to enforce), `max_logprobs` by vLLM's default
    `max_logprobs` of 20. `max_inflight` caps the requests one replica serves at once (429
    past it)."""

    max_tokens: int = 131072
    max_n: int = 128
    max_stop: int = 4
    max_prompt_tokens: int = 1 << 20
    max_logprobs: int = 20  # chat `top_logprobs` and completions `logprobs` (vLLM's default)
    max_inflight: int = 1024

    def __post_init__(self) -> None:
        _positive(self, "limits.", ("max_tokens", "max_n", "max_stop", "max_prompt_tokens",
                                    "max_inflight"))
        for name, hi in (("max_logprobs", 20), ("max_n", 128), ("max_tokens", 2**31)):
            if not 0 <= getattr(self, name) <= hi:
                raise ValueError(f"gateway.limits.{name}: must be in 0..{hi}, got "
                                 f"{getattr(self, name)}")


def _check_cost(model: str, params: Any) -> None:
    from meshd.scheduler.cost_model import CostModel

    name = f"gateway.routing.cost.{model}"
    if not isinstance(params, dict):
        raise ValueError(f"{name}: must be a table of cost-model parameters")
    for key, v in params.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0:
            raise ValueError(f"{name}.{key}: must be a number >= 0, got {v!r}")
    try:
        CostModel.from_params(params)
    except ValueError as e:
        valid = ", ".join(CostModel.__dataclass_fields__)
        raise ValueError(f"{name}: {e} (valid: {valid})") from None


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """How the router is built and fed. `decode` / `prefill` name the profiles that pick the
    decode and prefill worker: a built-in (`scheduler/profiles.py`: decode, prefill,
    round_robin, least_loaded, random_p2c, approx_tree) or one defined under `profiles`
    (`{filters, scorers, picker}` tables, see docs/operations.md). `pd` is the P/D decider.
    Load comes from each worker's `/metrics` every `scrape_interval_s`; a worker a request
    failed on is left out for `failure_backoff_s`. `cost` gives the SLO scorer's cost-model
    parameters per model (`{model = {prefill_ms_per_token = 0.05, ...}}`, keys of
    `scheduler/cost_model.py`; "*" for every model without its own); with `calibrate_cost`
    `prefill_ms_per_token` and `decode_base_ms` are measured per worker from its histograms
    once it has served (`workers/calibration.py`) and replace the configured figures."""

    decode: str = "decode"
    prefill: str = "prefill"
    profiles: dict[str, Any] = field(default_factory=dict)
    pd: PDConfig = field(default_factory=PDConfig)
    scrape_interval_s: float = 0.5
    scrape_timeout_s: float = 2.0
    failure_backoff_s: float = 5.0
    cost: dict[str, Any] = field(default_factory=dict)
    calibrate_cost: bool = True

    def __post_init__(self) -> None:
        _positive(self, "routing.", ("scrape_interval_s", "scrape_timeout_s",
                                     "failure_backoff_s"))
        for model, params in self.cost.items():
            _check_cost(model, params)
        from meshd.scheduler.profiles import BUILTIN, build_selector

        for name, spec in self.profiles.items():
            if not isinstance(spec, dict):
                raise ValueError(f"gateway.routing.profiles.{name}: must be a table")
            try:
                build_selector(spec, name)
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"gateway.routing.profiles.{name}: {e}") from None
        for role in ("decode", "prefill"):
            name = getattr(self, role)
            if name not in self.profiles and name not in BUILTIN:
                valid = ", ".join(sorted({*BUILTIN, *self.profiles}))
                raise ValueError(f"gateway.routing.{role}: unknown profile {name!r} "
                                 f"(valid: {valid})")

    def profile(self, name: str) -> dict[str, Any]:
        """The config of profile `name` (a user-defined one shadows a built-in)."""
        from meshd.scheduler.profiles import BUILTIN

        return dict(self.profiles.get(name) or BUILTIN[name])


@dataclass(frozen=True, slots=True)
class ReceiptsConfig:
    """`[gateway.receipts]`: the Ed25519 key receipts are signed with (created 0600 on first
    start). `meshd up` and `meshd coordinator start` default it to `receipt.key` in the
    coordinator's state dir, so every replica signs with one key; "" otherwise: each replica
    a key of its own (`serving/receipts.py`)."""

    key_file: str = ""


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """`[gateway.tracing]`: W3C trace context on every request (the client's `traceparent`
    continued, one per worker call passed on) and OpenTelemetry spans with the GenAI semantic
    conventions, exported over OTLP/HTTP when `otlp_endpoint` is set (`tracing/`). `sampler`:
    `parentbased_always_on` (default: every request, unless the client's parent says not),
    `always_on`, `always_off`, `ratio`, `parentbased_ratio`, `parentbased_always_off`;
    `ratio` for the ratio samplers."""

    enabled: bool = True
    sampler: str = "parentbased_always_on"
    ratio: float = 1.0
    otlp_endpoint: str = ""  # e.g. http://collector:4318/v1/traces; "": spans not exported
    otlp_headers: dict[str, str] = field(default_factory=dict)
    service_name: str = "meshd-gateway"
    export_interval_s: float = 1.0
    export_timeout_s: float = 10.0
    max_queue: int = 10_000  # traces waiting for export; past it the oldest are dropped

    def __post_init__(self) -> None:
        from meshd.coordinator.gateway.tracing.context import Sampler

        Sampler(self.sampler, self.ratio)  # raises naming the field
        if self.otlp_endpoint and not self.otlp_endpoint.startswith(("http://", "https://")):
            raise ValueError(f"gateway.tracing.otlp_endpoint: must be an http(s) URL, got "
                             f"{self.otlp_endpoint!r}")
        _positive(self, "tracing.", ("export_interval_s", "export_timeout_s"))
        if self.max_queue < 1:
            raise ValueError("gateway.tracing.max_queue: must be >= 1")


@dataclass(frozen=True, slots=True)
class RecordsConfig:
    """`[gateway.records]`: the local store of request records (`records/`), one SQLite file
    per replica in `dir` (`meshd up` and `meshd coordinator start` default it to `records/`
    in the coordinator's state dir; "": no store). Raw records are kept `raw_days`, their
    hourly rollups `rollup_days`; at most `max_raw_rows` raw rows (the oldest go first, still
    rolled up); `max_buffer` records wait for the next flush (every `flush_interval_s`)."""

    dir: str = ""
    raw_days: float = 7.0
    rollup_days: float = 90.0
    max_raw_rows: int = 1_000_000
    max_buffer: int = 100_000
    flush_interval_s: float = 1.0

    def __post_init__(self) -> None:
        self.policy()  # raises naming the field
        _positive(self, "records.", ("flush_interval_s",))

    def policy(self) -> RetentionPolicy:
        return RetentionPolicy(self.raw_days, self.rollup_days, self.max_raw_rows,
                               self.max_buffer)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The OpenAI gateway: replicas sharing one port and the sections above.

    `static_workers` fronts servers the operator already runs: `URL` or `ROLE=URL` for vLLM
    (and meshd engine) servers, which take part in disaggregated serving (role prefill|decode|
    both, default both); `openai=URL` for any other OpenAI-compatible server, which the gateway
    proxies requests to as they are. Models come from each server's `/v1/models`.
    `api_keys` maps tenant -> key (empty: no auth). `hash_seed` must equal the workers'
    PYTHONHASHSEED (vLLM) / prefix hash seed (embedded engine) for prefix-aware routing.
    Replica i serves its own `/metrics` on `metrics_port + i` (0: a free port, published
    through its Ray actor); `/metrics` on `port` is the fleet's, merged from every replica's
    own, waiting at most `metrics_timeout_s` for them (`gateway/fleet.py`).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 2  # gateway processes sharing the port (SO_REUSEPORT)
    api_keys: dict[str, str] = field(default_factory=dict)
    static_workers: tuple[str, ...] = ()
    # The bearer token the static workers demand (`--api-key` on vLLM, `--api-key-file` on a
    # meshd engine): the first line of this file, read when the gateway starts; "": none.
    static_workers_token_file: str = ""
    tokenizers: dict[str, str] = field(default_factory=dict)  # model -> tokenizer dir
    # model -> the parser of its tool calls / reasoning in generated text (vLLM's names;
    # a model without one: what its chat template writes, `serving/output_parsers.py`)
    tool_parsers: dict[str, str] = field(default_factory=dict)
    reasoning_parsers: dict[str, str] = field(default_factory=dict)
    hash_seed: str = "0"
    membership_interval_s: float = 1.0
    metrics_port: int = 0  # replica i's own /metrics at metrics_port + i; 0: a free port each
    metrics_timeout_s: float = 2.0  # the shared port's /metrics waits this long for siblings
    http: HttpConfig = field(default_factory=HttpConfig)
    deadlines: Deadlines = field(default_factory=Deadlines)
    limits: Limits = field(default_factory=Limits)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    governance: GovernanceConfig = field(default_factory=GovernanceConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    confidence: ConfidenceConfig = field(default_factory=ConfidenceConfig)
    receipts: ReceiptsConfig = field(default_factory=ReceiptsConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    records: RecordsConfig = field(default_factory=RecordsConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"gateway.port: must be in 0..65535, got {self.port}")
        if not 0 <= self.replicas <= 64:
            raise ValueError(f"gateway.replicas: must be in 0..64, got {self.replicas}")
        for tenant, key in self.api_keys.items():
            if not tenant or len(key) < 8:
                raise ValueError(f"gateway.api_keys.{tenant}: keys need >= 8 characters")
        for entry in self.static_workers:
            role, _, url = entry.rpartition("=")
            if not (url.startswith("http://")
                    and role in ("", "prefill", "decode", "both", "openai")):
                raise ValueError(f"gateway.static_workers: entries are http://HOST:PORT or "
                                 f"ROLE=http://HOST:PORT, got {entry!r}")
        _positive(self, "", ("membership_interval_s", "metrics_timeout_s"))
        self._check_metrics_ports()
        self._check_parsers()

    def _check_parsers(self) -> None:
        from meshd.coordinator.gateway.tools.registry import REASONING_PARSERS, TOOL_PARSERS

        for where, names, registry in (("tool_parsers", self.tool_parsers, TOOL_PARSERS),
                                       ("reasoning_parsers", self.reasoning_parsers,
                                        REASONING_PARSERS)):
            for model, name in names.items():
                if name not in registry.names():
                    raise ValueError(f"gateway.{where}.{model}: unknown parser {name!r}; "
                                     f"valid: {', '.join(sorted(registry.names()))}")

    def _check_metrics_ports(self) -> None:
        top = self.metrics_port + max(self.replicas, 1) - 1
        if self.metrics_port < 0 or top > 65535:
            raise ValueError(f"gateway.metrics_port: replica ports {self.metrics_port}..{top} "
                             f"must lie in 0..65535")
        if self.metrics_port and self.port and self.metrics_port <= self.port <= top:
            raise ValueError(f"gateway.metrics_port: replica ports {self.metrics_port}..{top} "
                             f"include gateway.port {self.port}")

    @property
    def handler_timeout_s(self) -> float:
        return self.deadlines.total_s + self.http.handler_grace_s


# Fields that moved into a section (the loader names the new place instead of "unknown").
MOVED = {"total_timeout_s": "deadlines.total_s", "prefill_timeout_s": "deadlines.prefill_s",
         "first_token_timeout_s": "deadlines.first_token_s",
         "inter_token_timeout_s": "deadlines.inter_token_s",
         "max_body_bytes": "http.max_body_bytes",
         "pd_min_uncached_tokens": "routing.pd.min_uncached_tokens",
         "scrape_interval_s": "routing.scrape_interval_s"}
