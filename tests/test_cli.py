"""The `meshd` CLI in real subprocesses: identity, trust, config errors, coordinator start/stop."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from support.net import free_port


def meshd(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshd", *args], capture_output=True,
                          text=True, timeout=90, env={**os.environ, **env})


def test_identity_show_and_trust_lifecycle(tmp_path: Path) -> None:
    agent_dir, coord_dir = str(tmp_path / "agent"), str(tmp_path / "coord")
    out = meshd("identity", "show", "--state-dir", agent_dir)
    assert out.returncode == 0, out.stderr
    lines = dict(li.split(":", 1) for li in out.stdout.splitlines() if ": " in li)
    node_id, pub = lines["node id"].strip(), lines["public key"].strip()
    assert len(bytes.fromhex(pub)) == 32
    again = meshd("identity", "show", "--state-dir", agent_dir)
    assert node_id in again.stdout  # same key on the second start

    assert meshd("trust", "--state-dir", coord_dir, "add", pub, "--label", "gpu-1").returncode == 0
    listing = meshd("trust", "--state-dir", coord_dir, "list").stdout
    assert node_id in listing and "trusted" in listing and "gpu-1" in listing
    rev = meshd("trust", "--state-dir", coord_dir, "revoke", node_id)
    assert rev.returncode == 0 and f"revoked {node_id}" in rev.stdout
    assert "revoked" in meshd("trust", "--state-dir", coord_dir, "list").stdout
    tok = meshd("trust", "--state-dir", coord_dir, "token", "--ttl", "60", "--label", "r4")
    assert tok.returncode == 0 and tok.stdout.startswith("mjt_")
    assert "r4" in meshd("trust", "--state-dir", coord_dir, "list").stdout

    bad = meshd("trust", "--state-dir", coord_dir, "add", "nothex")
    assert bad.returncode == 1 and "must be hex" in bad.stderr and "Traceback" not in bad.stderr
    pinned = meshd("trust", "--state-dir", coord_dir, "add", pub, "--host", "GPU-7.lan")
    assert pinned.returncode == 0 and "workers may listen on gpu-7.lan" in pinned.stdout
    assert "was revoked at" in pinned.stderr  # re-trusting a revoked key says so
    assert "gpu-7.lan" in meshd("trust", "--state-dir", coord_dir, "list").stdout
    bad = meshd("trust", "--state-dir", coord_dir, "add", pub, "--host", "a b")
    assert bad.returncode == 1 and "--host 'a b'" in bad.stderr and "Traceback" not in bad.stderr
    attrs = meshd("trust", "--state-dir", coord_dir, "add", pub, "--attr", "privacy=restricted",
                  "--attr", "zone=eu")
    assert attrs.returncode == 0 and "may claim privacy=restricted zone=eu" in attrs.stdout
    assert "privacy=restricted,zone=eu" in meshd("trust", "--state-dir", coord_dir,
                                                 "list").stdout
    bad = meshd("trust", "--state-dir", coord_dir, "add", pub, "--attr", "privacy")
    assert bad.returncode == 1 and "--attr 'privacy'" in bad.stderr and "Traceback" not in \
        bad.stderr
    missing = meshd("trust", "--state-dir", coord_dir, "revoke", "n-nosuch")
    assert missing.returncode == 1 and "no key" in missing.stderr


def test_unsafe_key_file_is_refused_clearly(tmp_path: Path) -> None:
    meshd("identity", "show", "--state-dir", str(tmp_path))
    (tmp_path / "node.key").chmod(0o644)
    out = meshd("identity", "show", "--state-dir", str(tmp_path))
    assert out.returncode == 1
    assert "chmod 600" in out.stderr and "Traceback" not in out.stderr


def test_config_errors_exit_2_with_field_name(tmp_path: Path) -> None:
    out = meshd("status", MESHD_COORDINATOR_GRPC_PORT="99999")
    assert out.returncode == 2
    assert "coordinator.grpc_port" in out.stderr and "Traceback" not in out.stderr


def test_status_without_coordinator_is_a_clear_error(tmp_path: Path) -> None:
    coord = str(tmp_path / "coord")
    meshd("trust", "--state-dir", coord, "list")
    from meshd.node_agent import identity

    identity.load_or_create(coord, "admin.key")
    out = meshd("status", "--state-dir", coord, "--coordinator", f"127.0.0.1:{free_port()}",
                MESHD_AGENT_RPC_TIMEOUT_S="1")
    assert out.returncode == 1 and "UNAVAILABLE" in out.stderr


def test_coordinator_start_stop_on_existing_ray(ray_session: Any, tmp_path: Path) -> None:
    gcs = ray_session.address_info["gcs_address"]
    port = free_port()
    env = {"MESHD_RAY_NAMESPACE": "meshd-cli-test", "MESHD_COORDINATOR_STATE_DIR":
           str(tmp_path / "coord"), "MESHD_COORDINATOR_METRICS_PORT": "0"}
    out = meshd("coordinator", "start", "--ray-address", gcs, "--grpc-port", str(port), **env)
    assert out.returncode == 0, out.stderr
    assert f"control plane 127.0.0.1:{port}" in out.stdout
    metrics_url = out.stdout.split("metrics ")[1].split(",")[0]
    deadline = time.time() + 10
    body = ""
    while time.time() < deadline and "meshd_nodes" not in body:
        body = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    assert 'meshd_nodes{state="alive"} 0.0' in body
    status = meshd("status", "--coordinator", f"127.0.0.1:{port}", **env)
    assert status.returncode == 0 and "(no nodes registered)" in status.stdout
    stop = meshd("coordinator", "stop", "--ray-address", gcs, **env)
    assert stop.returncode == 0 and "coordinator stopped" in stop.stdout
    again = meshd("coordinator", "stop", "--ray-address", gcs, **env)
    assert "no coordinator was running" in again.stdout
