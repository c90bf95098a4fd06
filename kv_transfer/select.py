"""Which KV transport two engines should use. Pure: no I/O.

Decided from `HostFacts` (what a capability report, or a prefill response's `meshd_host`, says
about a host); `kv_device` says where the engines keep their KV cache. First match wins:

1. CPU KV: same host -> `shm`; else `tcp`.
2. CUDA KV, either side without GPUs -> `tcp` (staged through host memory).
3. CUDA KV, same host -> `cuda_ipc` (NCCL refuses two ranks on one GPU; IPC does not care).
4. CUDA KV, both hosts have an ACTIVE RDMA port (InfiniBand, or Ethernet = RoCE) -> `nccl`.
5. CUDA KV, both hosts have NVLink-connected GPUs -> `nccl` (multi-node NVLink domains; NCCL
   picks NVLink, IB or sockets itself, so this is never worse than a socket path).
6. else `tcp`.

Same host: equal hostnames, or equal non-empty addresses. (Containers on one machine with their
own hostnames count as different hosts, which is what shared memory and CUDA IPC need: their
/dev/shm and IPC namespaces differ.)

`pick` applies the rule to what a prefill side actually offers, falling back to `tcp`;
`offer` is what a prefill side configured with `auto` serves, and `pull_transport` is the decode
side's choice from a prefill response (both the vLLM connector and the embedded engine).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from meshd.capabilities import Capabilities
from meshd.kv_transfer.params import RemotePrefill

RDMA_LINK_LAYERS = ("InfiniBand", "Ethernet")  # Ethernet link layer on an RDMA port = RoCE


class TransportChoice(NamedTuple):
    name: str  # a name registered in transport.py
    reason: str


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What the transport choice needs to know about one host."""

    hostname: str
    address: str = ""
    gpus: bool = False
    rdma: bool = False  # an ACTIVE InfiniBand or RoCE port
    nvlink: bool = False  # GPUs with NVLink peers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> HostFacts | None:
        """The facts, or None when `d` is not a well-formed facts dict (from the wire)."""
        if not isinstance(d, Mapping) or not isinstance(d.get("hostname"), str):
            return None
        flags = {k: d.get(k, False) for k in ("gpus", "rdma", "nvlink")}
        address = d.get("address", "")
        if not isinstance(address, str) or not all(isinstance(v, bool) for v in flags.values()):
            return None
        return HostFacts(d["hostname"], address, **flags)


def facts_of(c: Capabilities) -> HostFacts:
    return HostFacts(
        hostname=c.host.hostname, address=c.host.address, gpus=bool(c.gpus),
        rdma=any(r.state.upper() == "ACTIVE" and r.link_layer in RDMA_LINK_LAYERS
                 for r in c.rdma),
        nvlink=any(g.nvlink_peers for g in c.gpus))


def same_host(a: HostFacts, b: HostFacts) -> bool:
    if a.hostname == b.hostname:
        return True
    return bool(a.address) and a.address == b.address


def choose(local: HostFacts, remote: HostFacts, kv_device: str = "cuda") -> TransportChoice:
    """The transport for moving KV between `local` and `remote` (symmetric in the two)."""
    if kv_device not in ("cuda", "cpu"):
        raise ValueError(f"kv_device: must be 'cuda' or 'cpu', got {kv_device!r}")
    near = same_host(local, remote)
    if kv_device == "cpu":
        return (TransportChoice("shm", "CPU KV on one host") if near
                else TransportChoice("tcp", "CPU KV across hosts"))
    if not local.gpus or not remote.gpus:
        return TransportChoice("tcp", "a peer reports no GPU")
    if near:
        return TransportChoice("cuda_ipc", "GPU KV on one host")
    if local.rdma and remote.rdma:
        return TransportChoice("nccl", "both hosts have an active RDMA port")
    if local.nvlink and remote.nvlink:
        return TransportChoice("nccl", "both hosts have NVLink GPUs")
    return TransportChoice("tcp", "no GPU fabric shared by both hosts")


def choose_transport(local: Capabilities, remote: Capabilities,
                     kv_device: str = "cuda") -> TransportChoice:
    """`choose` over two capability reports."""
    return choose(facts_of(local), facts_of(remote), kv_device)


def pick(local: HostFacts, remote: HostFacts | None, kv_device: str,
         offered: Collection[str]) -> TransportChoice:
    """The rule's choice if the remote side offers it, else `tcp`. Without remote facts, `tcp`.
    Raises ValueError if `tcp` is needed but not offered (every meshd server offers it)."""
    if remote is not None:
        best = choose(local, remote, kv_device)
        if best.name in offered:
            return best
        reason = f"{best.name} ({best.reason}) is not offered"
    else:
        reason = "the prefill side sent no host facts"
    if "tcp" not in offered:
        raise ValueError(f"no usable transport: {reason}, and tcp is not offered either")
    return TransportChoice("tcp", reason)


def offer(transport: str, kv_device: str, facts: HostFacts, nccl_importable: bool = False
          ) -> list[str]:
    """What a prefill side serves (`meshd_transports`): the configured transport, or for
    `auto` everything that can help a peer, `tcp` first (the default any decode side can
    use): CPU KV `tcp`, `shm`; CUDA KV `tcp`, `cuda_ipc`, and `nccl` when this host has an
    RDMA port or NVLink and cupy is importable (a decode side picks nccl only between such
    hosts)."""
    if transport != "auto":
        return [transport]
    if kv_device != "cuda":
        return ["tcp", "shm"]
    extra = ["nccl"] if (facts.rdma or facts.nvlink) and nccl_importable else []
    return ["tcp", "cuda_ipc", *extra]


def pull_transport(remote: RemotePrefill, local: HostFacts, kv_device: str) -> TransportChoice:
    """Which of the prefill side's transports to pull over: its only one, or `pick` over its
    list with both sides' host facts."""
    if not remote.offered:
        return TransportChoice(remote.transport, "the only transport offered")
    facts = HostFacts.from_dict(remote.host) if remote.host is not None else None
    try:
        return pick(local, facts, kv_device, remote.transports())
    except ValueError as exc:
        return TransportChoice(remote.transport, str(exc))
