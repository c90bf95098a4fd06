"""Which KV transport two engines should use, from both peers' capability reports. Pure: no I/O.

Rules, first match wins (`kv_device` says where the engines keep their KV cache):

1. CPU KV: same host -> `shm`; else `tcp`.
2. CUDA KV, either side without GPUs in its report -> `tcp` (the connector stages through host).
3. CUDA KV, same host -> `cuda_ipc` (NCCL refuses two ranks on one GPU; IPC does not care).
4. CUDA KV, both hosts have an ACTIVE RDMA port (InfiniBand, or Ethernet = RoCE) -> `nccl`.
5. CUDA KV, both hosts have NVLink-connected GPUs -> `nccl` (multi-node NVLink domains; NCCL
   picks NVLink, IB or sockets itself, so this is never worse than a socket path).
6. else `tcp`.

Same host: equal hostnames, or equal non-empty addresses.
"""

from __future__ import annotations

from typing import NamedTuple

from meshd.capabilities import Capabilities

RDMA_LINK_LAYERS = ("InfiniBand", "Ethernet")  # Ethernet link layer on an RDMA port = RoCE


class TransportChoice(NamedTuple):
    name: str  # a name registered in transport.py
    reason: str


def same_host(a: Capabilities, b: Capabilities) -> bool:
    if a.host.hostname == b.host.hostname:
        return True
    return bool(a.host.address) and a.host.address == b.host.address


def has_rdma(c: Capabilities) -> bool:
    return any(r.state.upper() == "ACTIVE" and r.link_layer in RDMA_LINK_LAYERS for r in c.rdma)


def has_nvlink(c: Capabilities) -> bool:
    return any(g.nvlink_peers for g in c.gpus)


def choose_transport(local: Capabilities, remote: Capabilities,
                     kv_device: str = "cuda") -> TransportChoice:
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
    if has_rdma(local) and has_rdma(remote):
        return TransportChoice("nccl", "both hosts have an active RDMA port")
    if has_nvlink(local) and has_nvlink(remote):
        return TransportChoice("nccl", "both hosts have NVLink GPUs")
    return TransportChoice("tcp", "no GPU fabric shared by both hosts")
