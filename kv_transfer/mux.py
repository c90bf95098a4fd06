"""Several transports served over the same KV on one port (the prefill side's `auto` mode).

Every transport's server is built without a listener of its own (`listen=False`) and hands its
server half (`handler`: memory + stream function) to a `MuxServer`, whose one listener runs the
shared handshake; the client's hello names the transport, and that transport's half serves the
fetch. So a decode peer on the same host can pull over `shm` or `cuda_ipc` while one on another
host pulls over `nccl` or `tcp` from the same port, each after the same mutual authentication.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from meshd.kv_transfer.conn import Handler, Listener, ServerConfig, ServerStats, serve_connection
from meshd.kv_transfer.transport import BlockSource, Peer, make_server

if TYPE_CHECKING:
    import torch

    from meshd.kv_transfer.auth import Authenticator
    from meshd.kv_transfer.layout import BlockLayout

log = logging.getLogger(__name__)


class MuxServer:
    """Serves the given transports' servers (built with `listen=False`) on one port until
    `close()`, which also closes them. `offered` lists their registry names (e.g. `tcp`)."""

    name = "mux"

    def __init__(self, servers: Sequence[Any], offered: Sequence[str], auth: Authenticator,
                 source: BlockSource, host: str = "127.0.0.1", port: int = 0,
                 config: ServerConfig | None = None) -> None:
        if not servers or len(servers) != len(offered):
            raise ValueError("MuxServer: one registry name per server, at least one server")
        self._handlers: dict[str, Handler] = {s.name: s.handler for s in servers}
        layouts = {h.memory.layout for h in self._handlers.values()}
        if len(layouts) != 1 or len(self._handlers) != len(servers):
            raise ValueError("MuxServer: servers must serve one KV (one layout, distinct names)")
        self._servers = list(servers)
        self.offered = list(offered)
        self.wire_names = sorted(self._handlers)
        self._auth, self._source = auth, source
        self._config = config or ServerConfig()
        self.stats = ServerStats()
        self._listener = Listener(host, port, self._serve)

    @property
    def address(self) -> Peer:
        return self._listener.address

    def close(self) -> None:
        self._listener.close()
        for s in self._servers:
            s.close()

    def _serve(self, sock: socket.socket) -> None:
        serve_connection(sock, self._handlers, self._auth, self._source, self.stats,
                         self._config)


def make_mux_server(names: Sequence[str], kv_caches: Sequence[torch.Tensor],
                    layout: BlockLayout, auth: Authenticator, source: BlockSource,
                    host: str = "127.0.0.1", port: int = 0, *,
                    config: ServerConfig | None = None, views: str = "engine",
                    ) -> tuple[MuxServer, dict[str, str]]:
    """A `MuxServer` over every transport in `names` that can run here. Returns it and, by
    name, why the others cannot (e.g. `nccl` without cupy). Raises ValueError if none can."""
    servers, offered, skipped = [], [], {}
    for name in names:
        try:
            servers.append(make_server(name, kv_caches, layout, auth, source, host, port,
                                       config=config, views=views, listen=False))
            offered.append(name)
        except (ValueError, RuntimeError, ImportError, OSError) as exc:
            skipped[name] = str(exc)
            log.warning("kv transfer: not serving %s here: %s", name, exc)
    if not servers:
        raise ValueError(f"no transport of {list(names)} can run here: {skipped}")
    return MuxServer(servers, offered, auth, source, host, port, config), skipped
