"""The prefill side's KV serving setup, one for the embedded engine (`WorkerServer`) and meshd's
vLLM connector (`MeshdConnector`).

`make_offer` decides what a prefill side serves (a configured transport, or `auto`: everything
that can help a peer, `select.offer`) as a `KVOffer`, which also builds the
`kv_transfer_params` its responses carry. `serve_kv` starts the one listening `MuxServer` for
an offer over the engine's KV views, authenticating peers and serving the blocks its
`BlockSource` (the lease table) holds. They are separate calls because vLLM's scheduler process
answers requests with the offer while only its worker processes hold KV memory.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from meshd.kv_transfer.mux import MuxServer, make_mux_server
from meshd.kv_transfer.params import prefill_params
from meshd.kv_transfer.select import HostFacts, offer
from meshd.kv_transfer.transport import BlockSource, KVViews, Peer, make_server

if TYPE_CHECKING:
    from meshd.kv_transfer.auth import Authenticator
    from meshd.kv_transfer.conn import ServerConfig

@dataclass(frozen=True, slots=True)
class KVOffer:
    """What a prefill side serves: registry names, the default (what any decode side can use)
    first, and this host's facts. With several, the params list them all (`meshd_transports`)
    with the facts (`meshd_host`) so each decode side picks per pair (`select.pull_transport`);
    with one, the params name just it."""

    transports: tuple[str, ...]
    facts: HostFacts

    def __post_init__(self) -> None:
        if not self.transports:
            raise ValueError("KVOffer.transports: at least one transport")

    @property
    def default(self) -> str:
        return self.transports[0]

    @property
    def offered(self) -> tuple[str, ...]:
        """`meshd_transports`: all of them when there are several, else ()."""
        return self.transports if len(self.transports) > 1 else ()

    @property
    def host(self) -> dict[str, Any] | None:
        """`meshd_host`: this host's facts when there are several transports, else None."""
        return self.facts.to_dict() if len(self.transports) > 1 else None

    def params(self, *, request_id: str, block_ids: Sequence[int], engine_id: str, peer: Peer,
               num_tokens: int, prompt: Sequence[int] | None = None, tp_size: int = 1
               ) -> dict[str, Any]:
        """The `kv_transfer_params` of a prefill response (`params.prefill_params`)."""
        return prefill_params(request_id=request_id, block_ids=block_ids, engine_id=engine_id,
                              peer=peer, transport=self.default, num_tokens=num_tokens,
                              tp_size=tp_size, prompt=prompt, offered=self.offered,
                              host=self.host)


def make_offer(transport: str, kv_device: str, facts: HostFacts) -> KVOffer:
    """`transport`: a registry name, or `auto` (`select.offer`: CPU KV `tcp`, `shm`; CUDA KV
    `tcp`, `cuda_ipc`, and `nccl` where this host has RDMA or NVLink and cupy is importable)."""
    cupy = kv_device == "cuda" and importlib.util.find_spec("cupy") is not None
    return KVOffer(tuple(offer(transport, kv_device, facts, cupy)), facts)


class KVServing(NamedTuple):
    """A started KV server and, by name, why transports of its offer are not served here."""

    server: MuxServer
    skipped: dict[str, str]

    def peer(self, advertise_host: str = "") -> Peer:
        """What prefill params report as `remote_host`/`remote_port`: the bound address, with
        `advertise_host` in place of the bound host when given."""
        bound = self.server.address
        return Peer(advertise_host or bound.host, bound.port)


def serve_kv(kv: KVOffer, views: KVViews, auth: Authenticator, source: BlockSource,
             bind: Peer, *, config: ServerConfig | None = None) -> KVServing:
    """Listen on `bind` (port 0: any free one) for `kv`'s transports until `server.close()`.

    One transport: it must run here, else this raises (ValueError, RuntimeError, ImportError
    or OSError from building it). Several (`auto`): those that cannot run here are skipped and
    listed in `skipped` (a decode peer that picks one fails its pull and prefills locally);
    ValueError if none can."""
    if len(kv.transports) == 1:
        server = make_server(kv.default, views.tensors, views.layout, auth, source, bind.host,
                             bind.port, config=config, views=views.kind)
        return KVServing(server, {})
    server, skipped = make_mux_server(kv.transports, views.tensors, views.layout, auth, source,
                                      bind.host, bind.port, config=config, views=views.kind)
    return KVServing(server, skipped)
