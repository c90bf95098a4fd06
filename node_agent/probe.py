"""Capability probe: GPUs through NVML (pynvml), RDMA NICs from sysfs, host CPU and memory.

On a host without an NVIDIA driver NVML raises `NVMLError_LibraryNotFound`; the probe then
returns a CPU-only report and logs one clear line. The NVML module and the sysfs root are
parameters so tests can run the real probe code against a recorded NVML fixture.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from meshd import __version__
from meshd.capabilities import Capabilities, Experts, Gpu, Host, Rdma, Worker

log = logging.getLogger("meshd.agent.probe")
_PROC_MEMINFO = "/proc/meminfo"


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def probe_gpus(nvml: ModuleType | Any | None = None) -> tuple[tuple[Gpu, ...], str]:
    """GPUs seen by NVML and a note ("" when NVML worked). Never raises for a missing driver."""
    if nvml is None:
        try:
            import pynvml as nvml_mod  # nvidia-ml-py
        except ImportError:
            return (), "nvidia-ml-py is not installed: CPU-only report"
        nvml = nvml_mod
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as e:
        note = f"NVML not available ({_text(e)}): CPU-only report"
        log.info("no GPUs: %s", note)
        return (), note
    try:
        gpus = tuple(_gpu(nvml, i) for i in range(nvml.nvmlDeviceGetCount()))
    finally:
        nvml.nvmlShutdown()
    return gpus, ""


def _gpu(nvml: Any, index: int) -> Gpu:
    h = nvml.nvmlDeviceGetHandleByIndex(index)
    mem = nvml.nvmlDeviceGetMemoryInfo(h)
    try:
        cc = tuple(int(x) for x in nvml.nvmlDeviceGetCudaComputeCapability(h))
    except nvml.NVMLError:
        cc = (0, 0)
    pci = _text(nvml.nvmlDeviceGetPciInfo(h).busId)
    return Gpu(index=index, name=_text(nvml.nvmlDeviceGetName(h)),
               uuid=_text(nvml.nvmlDeviceGetUUID(h)), memory_total_bytes=int(mem.total),
               memory_free_bytes=int(mem.free), compute_capability=(cc[0], cc[1]),
               nvlink_peers=_nvlink_peers(nvml, h), pci_bus_id=pci)


def _nvlink_peers(nvml: Any, handle: Any) -> tuple[str, ...]:
    peers: list[str] = []
    for link in range(int(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18))):
        try:
            if nvml.nvmlDeviceGetNvLinkState(handle, link) != nvml.NVML_FEATURE_ENABLED:
                continue
            bus = _text(nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId)
        except nvml.NVMLError:  # NotSupported on PCIe cards, InvalidArgument past the last link
            continue
        if bus not in peers:
            peers.append(bus)
    return tuple(sorted(peers))


def probe_rdma(sysfs: str | Path = "/sys/class/infiniband") -> tuple[Rdma, ...]:
    """RDMA ports from `/sys/class/infiniband/<dev>/ports/<n>/{state,link_layer,rate}`."""
    root = Path(sysfs)
    if not root.is_dir():
        return ()
    out = []
    for dev in sorted(root.iterdir()):
        guid = _read(dev / "node_guid")
        ports = dev / "ports"
        for port in sorted(ports.iterdir(), key=lambda p: int(p.name)) if ports.is_dir() else ():
            state = _read(port / "state")  # e.g. "4: ACTIVE"
            rate = _read(port / "rate")  # e.g. "400 Gb/sec (4X NDR)"
            out.append(Rdma(name=dev.name, port=int(port.name),
                            state=state.split(":", 1)[-1].strip(),
                            link_layer=_read(port / "link_layer"),
                            rate_gbps=int(float(rate.split()[0])) if rate else 0,
                            node_guid=guid))
    return tuple(out)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def probe_host(address: str = "", meminfo: str = _PROC_MEMINFO) -> Host:
    fields: dict[str, int] = {}
    try:
        for line in Path(meminfo).read_text().splitlines():
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return Host(hostname=socket.gethostname(), cpu_count=os.cpu_count() or 1,
                memory_total_bytes=fields.get("MemTotal", 0),
                memory_available_bytes=fields.get("MemAvailable", 0),
                os=f"{platform.system()} {platform.release()}", address=address)


def probe(*, address: str = "", attributes: Mapping[str, str] | None = None,
          workers: tuple[Worker, ...] = (), experts: tuple[Experts, ...] = (),
          ray_node_id: str = "", nvml: Any | None = None,
          sysfs: str | Path = "/sys/class/infiniband") -> Capabilities:
    """The full capability report of this host."""
    gpus, note = probe_gpus(nvml)
    return Capabilities(host=probe_host(address), gpus=gpus, rdma=probe_rdma(sysfs),
                        ray_node_id=ray_node_id, workers=workers, experts=experts,
                        attributes=dict(attributes or {}), agent_version=__version__,
                        probe_note=note)
