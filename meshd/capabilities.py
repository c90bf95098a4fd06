"""Typed capability reports, shared by the agent (which probes) and the coordinator (which stores).

Protobuf messages are converted here, at the edge, and go no further in: the rest of meshd sees
these frozen dataclasses. `to_dict`/`from_dict` give the JSON form the coordinator persists;
`Member` is one worker of the routing set as the gateway receives it (`members()` of a report).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshd import endpoints
from meshd.proto.v1 import control_pb2 as pb

ROLES = {"prefill": pb.WORKER_ROLE_PREFILL, "decode": pb.WORKER_ROLE_DECODE,
         "both": pb.WORKER_ROLE_BOTH}
_ROLE_NAMES = {v: k for k, v in ROLES.items()}


def role_name(role: int) -> str | None:
    """A protobuf WorkerRole's name (prefill | decode | both), None if unset or unknown."""
    return _ROLE_NAMES.get(role)  # type: ignore[call-overload]
WORKER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# A worker's API token goes into an HTTP header line: visible ASCII only (no CR/LF, no spaces)
API_TOKEN = re.compile(r"[!-~]{16,256}")


@dataclass(frozen=True, slots=True)
class Gpu:
    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    memory_free_bytes: int = 0
    compute_capability: tuple[int, int] = (0, 0)
    nvlink_peers: tuple[str, ...] = ()
    pci_bus_id: str = ""


@dataclass(frozen=True, slots=True)
class Rdma:
    name: str
    port: int
    state: str
    link_layer: str
    rate_gbps: int = 0
    node_guid: str = ""


@dataclass(frozen=True, slots=True)
class Host:
    hostname: str
    cpu_count: int
    memory_total_bytes: int
    memory_available_bytes: int = 0
    os: str = ""
    address: str = ""


@dataclass(frozen=True, slots=True)
class Worker:
    worker_id: str
    endpoint: str
    role: str  # prefill | decode | both
    model: str
    engine: str = "embedded"
    kv_block_size: int = 16
    kv_capacity_blocks: int = 0
    kv_events_endpoint: str = ""
    kv_transfer_endpoint: str = ""
    gpu_indices: tuple[int, ...] = ()
    kv_events_replay_endpoint: str = ""
    # The bearer token the worker's serving API (and its KV-event ports) demand from the mesh's
    # gateways; "" = an open worker. Never printed (repr) nor shown by status answers.
    api_token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"worker {self.worker_id}: role must be one of {sorted(ROLES)}, "
                             f"got {self.role!r}")


@dataclass(frozen=True, slots=True)
class Experts:
    model: str
    worker_id: str
    layer: int
    experts: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Capabilities:
    host: Host
    gpus: tuple[Gpu, ...] = ()
    rdma: tuple[Rdma, ...] = ()
    ray_node_id: str = ""
    workers: tuple[Worker, ...] = ()
    experts: tuple[Experts, ...] = ()
    attributes: Mapping[str, str] = field(default_factory=dict)
    agent_version: str = ""
    probe_note: str = ""


@dataclass(frozen=True, slots=True)
class Member:
    """One worker of the routing set, with what routing needs from its node's report: the
    node's `attributes` and the worker's expert placement (`experts`, one record per MoE
    layer; empty: hosts all experts, or not MoE)."""

    node_id: str
    worker: Worker
    attributes: Mapping[str, str] = field(default_factory=dict)
    experts: tuple[Experts, ...] = ()


def members(node_id: str, c: Capabilities) -> list[Member]:
    """The routing-set members of one node's report (each worker with its own placement)."""
    placement: dict[str, list[Experts]] = {}
    for e in c.experts:
        placement.setdefault(e.worker_id, []).append(e)
    attrs = dict(c.attributes)
    return [Member(node_id, w, attrs, tuple(placement.get(w.worker_id, ()))) for w in c.workers]


def member_to_dict(m: Member) -> dict[str, Any]:
    """Plain data (the registry actor's answer): `node_id`, `worker`, `attributes`,
    `experts`."""
    return {"node_id": m.node_id, "worker": dataclasses.asdict(m.worker),
            "attributes": dict(m.attributes),
            "experts": [dataclasses.asdict(e) for e in m.experts]}


def member_from_dict(d: Mapping[str, Any]) -> Member:
    """Inverse of `member_to_dict`; raises ValueError (or KeyError/TypeError) on a bad row."""
    w = dict(d["worker"])
    w["gpu_indices"] = tuple(w.get("gpu_indices") or ())
    return Member(str(d["node_id"]), Worker(**w),
                  {str(k): str(v) for k, v in (d.get("attributes") or {}).items()},
                  tuple(Experts(**{**e, "experts": tuple(e["experts"])})
                        for e in d.get("experts") or ()))


def worker_to_pb(w: Worker) -> pb.WorkerInfo:
    return pb.WorkerInfo(
        worker_id=w.worker_id, endpoint=w.endpoint, role=ROLES[w.role], model=w.model,
        engine=w.engine, kv_block_size=w.kv_block_size, kv_capacity_blocks=w.kv_capacity_blocks,
        kv_events_endpoint=w.kv_events_endpoint, kv_transfer_endpoint=w.kv_transfer_endpoint,
        gpu_indices=list(w.gpu_indices), kv_events_replay_endpoint=w.kv_events_replay_endpoint,
        api_token=w.api_token)


def worker_from_pb(m: pb.WorkerInfo) -> Worker:
    role = _ROLE_NAMES.get(m.role)
    if role is None:
        raise ValueError(f"worker {m.worker_id!r}: role is unspecified")
    return Worker(m.worker_id, m.endpoint, role, m.model, m.engine, m.kv_block_size,
                  m.kv_capacity_blocks, m.kv_events_endpoint, m.kv_transfer_endpoint,
                  tuple(m.gpu_indices), m.kv_events_replay_endpoint, m.api_token)


def to_pb(c: Capabilities) -> pb.CapabilityReport:
    h = c.host
    return pb.CapabilityReport(
        host=pb.HostInfo(hostname=h.hostname, cpu_count=h.cpu_count,
                         memory_total_bytes=h.memory_total_bytes,
                         memory_available_bytes=h.memory_available_bytes, os=h.os,
                         address=h.address),
        gpus=[pb.GpuInfo(index=g.index, name=g.name, uuid=g.uuid,
                         memory_total_bytes=g.memory_total_bytes,
                         memory_free_bytes=g.memory_free_bytes,
                         compute_capability_major=g.compute_capability[0],
                         compute_capability_minor=g.compute_capability[1],
                         nvlink_peers=list(g.nvlink_peers), pci_bus_id=g.pci_bus_id)
              for g in c.gpus],
        rdma=[pb.RdmaDevice(name=r.name, port=r.port, state=r.state, link_layer=r.link_layer,
                            rate_gbps=r.rate_gbps, node_guid=r.node_guid) for r in c.rdma],
        ray_node_id=c.ray_node_id,
        workers=[worker_to_pb(w) for w in c.workers],
        experts=[pb.ExpertPlacement(model=e.model, worker_id=e.worker_id, layer=e.layer,
                                    experts=list(e.experts)) for e in c.experts],
        attributes=dict(c.attributes), agent_version=c.agent_version, probe_note=c.probe_note)


def check_workers(workers: Iterable[Worker]) -> None:
    """What a report's workers must be before anything routes to them: a worker id of
    [A-Za-z0-9._:-] (at most 128, unique in the report), an `http://host:port` endpoint, and
    `tcp://host:port` KV-event and `scheme://host:port` KV-transfer endpoints when given, and
    an API token (when given) of 16-256 visible ASCII characters. Raises ValueError naming the
    field (never quoting the token)."""
    seen: set[str] = set()
    for i, w in enumerate(workers):
        where = f"capabilities.workers[{i}]"
        if not WORKER_ID.fullmatch(w.worker_id):
            raise ValueError(f"{where}.worker_id: {w.worker_id!r} must be 1-128 of "
                             "A-Z a-z 0-9 . _ : - (starting with a letter or digit)")
        if w.worker_id in seen:
            raise ValueError(f"{where}.worker_id: {w.worker_id!r} appears twice in the report")
        seen.add(w.worker_id)
        if w.api_token and not API_TOKEN.fullmatch(w.api_token):
            raise ValueError(f"{where}.api_token: must be 16-256 visible ASCII characters "
                             "(no spaces or line breaks)")
        for name, schemes, optional in (("endpoint", ("http",), False),
                                        ("kv_events_endpoint", ("tcp",), True),
                                        ("kv_events_replay_endpoint", ("tcp",), True),
                                        ("kv_transfer_endpoint", None, True)):
            url = getattr(w, name)
            if optional and not url:
                continue
            try:
                endpoints.parse(url, schemes)
            except ValueError as e:
                raise ValueError(f"{where}.{name}: {e}") from None


def listeners(w: Worker) -> list[tuple[str, tuple[str, int]]]:
    """(field, (host, port)) of every endpoint `w` reports (valid ones: `check_workers`)."""
    out = []
    for name in ("endpoint", "kv_events_endpoint", "kv_events_replay_endpoint",
                 "kv_transfer_endpoint"):
        url = getattr(w, name)
        if url:
            out.append((name, endpoints.parse(url).address))
    return out


def from_pb(m: pb.CapabilityReport) -> Capabilities:
    """Convert a received report; raises ValueError naming the bad field."""
    if not m.HasField("host") or not m.host.hostname:
        raise ValueError("capabilities.host.hostname is required")
    h = m.host
    return Capabilities(
        host=Host(h.hostname, h.cpu_count, h.memory_total_bytes, h.memory_available_bytes,
                  h.os, h.address),
        gpus=tuple(Gpu(g.index, g.name, g.uuid, g.memory_total_bytes, g.memory_free_bytes,
                       (g.compute_capability_major, g.compute_capability_minor),
                       tuple(g.nvlink_peers), g.pci_bus_id) for g in m.gpus),
        rdma=tuple(Rdma(r.name, r.port, r.state, r.link_layer, r.rate_gbps, r.node_guid)
                   for r in m.rdma),
        ray_node_id=m.ray_node_id,
        workers=_checked(worker_from_pb(w) for w in m.workers),
        experts=tuple(Experts(e.model, e.worker_id, e.layer, tuple(e.experts))
                      for e in m.experts),
        attributes=dict(m.attributes), agent_version=m.agent_version, probe_note=m.probe_note)


def _checked(workers: Iterable[Worker]) -> tuple[Worker, ...]:
    out = tuple(workers)
    check_workers(out)
    return out


def to_dict(c: Capabilities) -> dict[str, Any]:
    d = dataclasses.asdict(c)
    d["attributes"] = dict(c.attributes)
    return d


def from_dict(d: Mapping[str, Any]) -> Capabilities:
    return Capabilities(
        host=Host(**d["host"]),
        gpus=tuple(Gpu(**{**g, "compute_capability": tuple(g["compute_capability"]),
                          "nvlink_peers": tuple(g["nvlink_peers"])}) for g in d["gpus"]),
        rdma=tuple(Rdma(**r) for r in d["rdma"]),
        ray_node_id=d["ray_node_id"],
        workers=tuple(Worker(**{**w, "gpu_indices": tuple(w["gpu_indices"])})
                      for w in d["workers"]),
        experts=tuple(Experts(**{**e, "experts": tuple(e["experts"])}) for e in d["experts"]),
        attributes=dict(d["attributes"]), agent_version=d["agent_version"],
        probe_note=d["probe_note"])
