"""The probe against a fixture at the NVML boundary, the real NVML-missing path, and sysfs."""

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from meshd.node_agent import probe

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "nvml_h100x4.json"


class FixtureNVML:
    """Answers NVML calls from a fixture; errors are pynvml's own exception types."""

    NVMLError = pynvml.NVMLError
    NVML_FEATURE_ENABLED = pynvml.NVML_FEATURE_ENABLED
    NVML_NVLINK_MAX_LINKS = pynvml.NVML_NVLINK_MAX_LINKS

    def __init__(self, data: dict[str, Any], init_error: Exception | None = None) -> None:
        self.gpus = data["gpus"]
        self.links = data["nvlink"]["enabled_links"]
        self.init_error = init_error
        self.initialized = 0

    def nvmlInit(self) -> None:
        if self.init_error:
            raise self.init_error
        self.initialized += 1

    def nvmlShutdown(self) -> None:
        self.initialized -= 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return str(self.gpus[h]["name"]).encode()  # older pynvml returns bytes

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return str(self.gpus[h]["uuid"])

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(total=self.gpus[h]["total"], free=self.gpus[h]["free"])

    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:
        return tuple(self.gpus[h]["cc"])  # type: ignore[return-value]

    def nvmlDeviceGetPciInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(busId=self.gpus[h]["bus"])

    def nvmlDeviceGetNvLinkState(self, h: int, link: int) -> int:
        if link >= self.links:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return int(pynvml.NVML_FEATURE_ENABLED)

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h: int, link: int) -> SimpleNamespace:
        peers = [g["bus"] for i, g in enumerate(self.gpus) if i != h]
        return SimpleNamespace(busId=peers[link % len(peers)])


def test_gpus_from_nvml_fixture() -> None:
    nvml = FixtureNVML(json.loads(FIXTURE.read_text()))
    gpus, note = probe.probe_gpus(nvml)
    assert note == ""
    assert nvml.initialized == 0  # shut down after probing
    assert [g.index for g in gpus] == [0, 1, 2, 3]
    g0 = gpus[0]
    assert g0.name == "NVIDIA H100 80GB HBM3"
    assert g0.uuid.startswith("GPU-")
    assert g0.memory_total_bytes == 85520809984
    assert g0.compute_capability == (9, 0)
    assert g0.pci_bus_id == "00000000:18:00.0"
    assert g0.nvlink_peers == ("00000000:2A:00.0", "00000000:3A:00.0", "00000000:5D:00.0")


def test_no_driver_gives_cpu_only_report_and_one_log_line(caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    nvml = FixtureNVML(json.loads(FIXTURE.read_text()),
                       init_error=pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    with caplog.at_level("INFO", logger="meshd.agent.probe"):
        gpus, note = probe.probe_gpus(nvml)
    assert gpus == ()
    assert "CPU-only" in note
    assert len([r for r in caplog.records if "no GPUs" in r.getMessage()]) == 1


def test_real_nvml_on_this_host() -> None:
    """The real pynvml on this host: GPUs when a driver is present, else the CPU-only note."""
    gpus, note = probe.probe_gpus()
    assert (len(gpus) > 0) != bool(note)


def test_rdma_from_sysfs(tmp_path: Path) -> None:
    dev = tmp_path / "mlx5_0"
    (dev / "ports" / "1").mkdir(parents=True)
    (dev / "node_guid").write_text("b8ce:f603:00a1:1e2c\n")
    (dev / "ports" / "1" / "state").write_text("4: ACTIVE\n")
    (dev / "ports" / "1" / "link_layer").write_text("InfiniBand\n")
    (dev / "ports" / "1" / "rate").write_text("400 Gb/sec (4X NDR)\n")
    (tmp_path / "mlx5_1" / "ports" / "1").mkdir(parents=True)
    (tmp_path / "mlx5_1" / "ports" / "1" / "state").write_text("1: DOWN\n")
    (tmp_path / "mlx5_1" / "ports" / "1" / "link_layer").write_text("Ethernet\n")
    rdma = probe.probe_rdma(tmp_path)
    assert [(r.name, r.port, r.state, r.link_layer, r.rate_gbps) for r in rdma] == [
        ("mlx5_0", 1, "ACTIVE", "InfiniBand", 400), ("mlx5_1", 1, "DOWN", "Ethernet", 0)]
    assert rdma[0].node_guid == "b8ce:f603:00a1:1e2c"
    assert probe.probe_rdma(tmp_path / "missing") == ()


def test_full_report_round_trips_through_protobuf() -> None:
    from meshd import capabilities as caps

    nvml = FixtureNVML(json.loads(FIXTURE.read_text()))
    report = probe.probe(address="10.0.0.5", attributes={"zone": "a"}, nvml=nvml,
                         workers=(caps.Worker("w0", "http://10.0.0.5:8100", "prefill", "tiny"),))
    assert report.host.memory_total_bytes > 0 and report.host.cpu_count >= 1
    back = caps.from_pb(caps.to_pb(report))
    assert back == report
    assert caps.from_dict(caps.to_dict(report)) == report
