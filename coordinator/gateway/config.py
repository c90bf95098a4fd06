"""`GatewayConfig`: one frozen, validated config for a gateway replica."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshd.coordinator.gateway.openai_api import Limits


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Listening address, limits and deadlines (seconds). Every wait on a client has one:
    `header_timeout` from a request's first byte to the end of its headers, `body_timeout` for
    the body after that, `keepalive_timeout` for an idle connection, `write_timeout` for a slow
    reader to drain a stream, `handler_timeout` for the whole handler, `shutdown_timeout` for
    draining in-flight requests. `api_keys` maps tenant name -> key; empty means no auth."""

    host: str = "127.0.0.1"
    port: int = 8000
    reuse_port: bool = True
    backlog: int = 2048
    max_body_bytes: int = 8 << 20
    max_header_bytes: int = 64 << 10
    max_pipelined: int = 16
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 75.0
    write_timeout: float = 30.0
    handler_timeout: float = 600.0
    shutdown_timeout: float = 30.0
    sweep_interval: float = 0.5
    api_keys: tuple[tuple[str, str], ...] = ()
    models: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be in [0, 65535], got {self.port}")
        for name in ("max_body_bytes", "max_header_bytes", "max_pipelined", "backlog"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")
        for name in ("header_timeout", "body_timeout", "keepalive_timeout", "write_timeout",
                     "handler_timeout", "shutdown_timeout", "sweep_interval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0")
        for tenant, key in self.api_keys:
            if not tenant or len(key) < 8:
                raise ValueError("api_keys: each needs a tenant name and a key of >= 8 chars")
