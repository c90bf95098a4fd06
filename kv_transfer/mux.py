"""The prefill side's KV server: one listener, one or several transports on one port.

Each transport contributes a `Sender` (its serving half: wire name + `conn.Handler`); the
server runs the shared handshake, the client's hello names the transport, and that sender
streams the fetch. `transport.make_server` serves one transport this way; `make_mux_server`
serves several (the prefill side's `auto` mode), so a decode peer on the same host can pull over
`shm` or `cuda_ipc` while one on another host pulls over `nccl` or `tcp` from the same port,
each after the same mutual authentication.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from meshd.kv_transfer.conn import Handler, Listener, ServerConfig, ServerStats, serve_connection
from meshd.kv_transfer.transport import BlockSource, Peer, make_sender

if TYPE_CHECKING:
    import torch

    from meshd.kv_transfer.auth import Authenticator
    from meshd.kv_transfer.layout import BlockLayout

log = logging.getLogger(__name__)


class Sender(Protocol):
    """A transport's serving half (`make_sender` in each transport module)."""

    name: str  # the wire name the handshake compares, e.g. `tcp+vllm-BHNC`
    handler: Handler

    def close(self) -> None: ...


class MuxServer:
    """Serves the given senders on one port until `close()`, which also closes them.
    `offered` lists their registry names (e.g. `tcp`); `name` their wire names."""

    def __init__(self, senders: Sequence[Sender], offered: Sequence[str], auth: Authenticator,
                 source: BlockSource, host: str = "127.0.0.1", port: int = 0,
                 config: ServerConfig | None = None) -> None:
        if not senders or len(senders) != len(offered):
            raise ValueError("MuxServer: one registry name per sender, at least one sender")
        self._handlers: dict[str, Handler] = {s.name: s.handler for s in senders}
        layouts = {h.memory.layout for h in self._handlers.values()}
        if len(layouts) != 1 or len(self._handlers) != len(senders):
            raise ValueError("MuxServer: senders must serve one KV (one layout, distinct names)")
        self._senders = list(senders)
        self.offered = list(offered)
        self.wire_names = sorted(self._handlers)
        self.name = "|".join(self.wire_names)
        self._auth, self._source = auth, source
        self._config = config or ServerConfig()
        self.stats = ServerStats()
        self._listener = Listener(host, port, self._serve)

    @property
    def address(self) -> Peer:
        return self._listener.address

    def close(self) -> None:
        self._listener.close()
        for s in self._senders:
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
    senders, offered, skipped = [], [], {}
    for name in names:
        try:
            senders.append(make_sender(name, kv_caches, layout, views=views))
            offered.append(name)
        except (ValueError, RuntimeError, ImportError, OSError) as exc:
            skipped[name] = str(exc)
            log.warning("kv transfer: not serving %s here: %s", name, exc)
    if not senders:
        raise ValueError(f"no transport of {list(names)} can run here: {skipped}")
    try:
        return MuxServer(senders, offered, auth, source, host, port, config), skipped
    except BaseException:
        for s in senders:
            s.close()
        raise
