"""Issue 13 §1: the monitoring files in cluster/ are valid and query only what meshd exports.

Every metric named in the Grafana dashboard, the Prometheus rules and the scrape config's
comments-free expressions must be a sample meshd's own registries produce: the gateway's
(`GatewayRuntime.metrics.registry`), the coordinator's (`ControlMetrics`) and a worker's
(`node_agent/engine/metrics.render` of a real engine). The dashboard file is what
scripts/make_dashboard.py writes. `promtool` (Debian/Ubuntu `prometheus`) checks the config
and the rules when it is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
_NAME = re.compile(r"\b((?:meshd|vllm)[:_][a-z0-9_:]*[a-z0-9])\b")
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count"),
             "gauge": ("",), "summary": ("_sum", "_count", ""), "unknown": ("",)}


def exported() -> set[str]:
    """Sample names meshd's components expose."""
    from meshd.coordinator.gateway.config import GatewayConfig
    from meshd.coordinator.gateway.runtime import GatewayRuntime
    from meshd.coordinator.metrics import ControlMetrics
    from meshd.kv_transfer.leases import LeaseStats
    from meshd.node_agent.engine.async_engine import DriverStats
    from meshd.node_agent.engine.disagg import DisaggStats
    from meshd.node_agent.engine.metrics import ServerSnapshot, render
    from tests.node_agent.engine.engine_helpers import make_engine

    names: set[str] = set()
    for registry in (GatewayRuntime(GatewayConfig(port=0)).metrics.registry,
                     ControlMetrics().registry):
        for fam in registry.collect():
            names |= {fam.name + s for s in _SUFFIXES.get(fam.type, ("",))}
    e = make_engine()
    d = DriverStats(e.stats(), e.blocks.num_free_blocks, e.config.num_blocks, 0, 0, 0.0)
    text = render("m", d, DisaggStats(), ServerSnapshot(0, LeaseStats(), {}, 0, 0))
    for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names |= {m.group(1) + s for s in _SUFFIXES.get(m.group(2), ("",))}
    return names


def used(text: str) -> set[str]:
    return {n for n in _NAME.findall(text) if not n.startswith("meshd:")}  # recording rules


def dashboard_exprs() -> list[str]:
    board = json.loads((CLUSTER / "grafana" / "meshd.json").read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def test_the_dashboard_is_the_generators_output() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_dashboard.py"),
                          "--check"], capture_output=True, timeout=60)
    assert out.returncode == 0, "run scripts/make_dashboard.py: cluster/grafana/meshd.json is stale"


def test_the_dashboard_is_well_formed() -> None:
    board = json.loads((CLUSTER / "grafana" / "meshd.json").read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert board["__inputs"][0]["name"] == "DS_PROMETHEUS" and board["uid"]
    for p in board["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}" and p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and all(t["expr"] for t in p["targets"])
    titles = " ".join(p["title"] for p in board["panels"]).lower()
    for topic in ("first token", "inter-token", "end-to-end", "p/d split", "prefix cache",
                  "kv transfer", "cache-routing", "tenant", "nodes"):
        assert topic in titles, topic  # what issue 13 asks the dashboard to cover


def test_every_queried_metric_is_exported() -> None:
    have = exported()
    wanted: dict[str, set[str]] = {"dashboard": set().union(*map(used, dashboard_exprs()))}
    wanted["rules"] = used((CLUSTER / "prometheus" / "meshd-rules.yml").read_text())
    assert wanted["dashboard"] and wanted["rules"]
    for where, names in wanted.items():
        missing = sorted(names - have)
        assert not missing, f"{where} queries metrics meshd does not export: {missing}"


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (apt-get install prometheus)")
def test_promtool_accepts_the_config_and_rules() -> None:
    d = CLUSTER / "prometheus"
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "meshd-rules.yml"]):
        out = subprocess.run(["promtool", *args], cwd=d, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("unit", ["meshd-agent.service", "meshd-coordinator.service"])
def test_systemd_units_verify_and_are_hardened(unit: str, tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit (its meshd binary swapped for one that exists
    here) and `security --offline` rates its exposure OK (<= 4.0 of 10; the units before
    hardening scored 9.2, UNSAFE)."""
    text = (CLUSTER / "systemd" / unit).read_text()
    local = tmp_path / unit
    exe = shutil.which("true") or "/bin/true"
    local.write_text(text.replace("/opt/meshd/.venv/bin/meshd", exe))
    out = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    sec = subprocess.run(["systemd-analyze", "security", "--offline=true", str(local)],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", sec.stdout + sec.stderr)
    assert m is not None, sec.stdout + sec.stderr
    assert float(m.group(1)) <= 4.0, sec.stdout
