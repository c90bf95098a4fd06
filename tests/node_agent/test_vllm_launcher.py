"""vLLM worker specs from `[vllm]` config: argv, env, GPU groups, ports; one live vllm-cpu run."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import os
import random
import signal
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from meshd import config
from meshd.capabilities import Gpu
from meshd.node_agent.identity import Identity
from meshd.node_agent.supervisor import Supervisor, WorkerSpec
from meshd.node_agent.vllm_launcher import VllmConfig, vllm_specs

HOST = "10.0.0.5"
SECRET = "/var/lib/meshd/agent/kv_secret"


def make_gpus(n: int) -> tuple[Gpu, ...]:
    return tuple(Gpu(i, "H100", f"GPU-{i}", 80 << 30) for i in range(n))


def make_specs(n_gpus: int = 8, **kw: Any) -> list[WorkerSpec]:
    cfg = VllmConfig(**{"model": "meta-llama/Llama-3.1-8B", "kv_secret_file": SECRET, **kw})
    return vllm_specs(cfg, "n1", HOST, make_gpus(n_gpus))


def flag(spec: WorkerSpec, name: str) -> str | None:
    argv = list(spec.argv)
    return argv[argv.index(name) + 1] if name in argv else None


def flag_json(spec: WorkerSpec, name: str) -> Any:
    value = flag(spec, name)
    return None if value is None else json.loads(value)


@pytest.mark.parametrize(("counts", "expected"), [
    ({"prefill": 1}, [("n1-vllm-p0", "prefill", "kv_producer")]),
    ({"decode": 1}, [("n1-vllm-d0", "decode", "kv_consumer")]),
    ({"both": 1}, [("n1-vllm-b0", "both", "kv_both")]),
    ({"prefill": 2, "decode": 1, "both": 1},
     [("n1-vllm-p0", "prefill", "kv_producer"), ("n1-vllm-p1", "prefill", "kv_producer"),
      ("n1-vllm-d2", "decode", "kv_consumer"), ("n1-vllm-b3", "both", "kv_both")]),
])
def test_roles_ids_and_meshd_connector(counts: dict[str, int],
                                       expected: list[tuple[str, str, str]]) -> None:
    specs = make_specs(**counts)
    assert [(s.worker.worker_id, s.worker.role, flag_json(s, "--kv-transfer-config")["kv_role"])
            for s in specs] == expected
    s = specs[0]
    assert flag_json(s, "--kv-transfer-config") == {
        "kv_connector": "MeshdConnector", "kv_role": expected[0][2],
        "engine_id": expected[0][0], "kv_load_failure_policy": "recompute",
        "kv_connector_module_path": "meshd.kv_transfer.vllm_connector",
        "kv_connector_extra_config": {"transport": "tcp", "host": HOST, "port": 8203,
                                      "secret_file": SECRET}}


def test_full_argv_env_and_worker_record() -> None:
    (s,) = make_specs(decode=1, served_model_name="llama8b", extra_args=("--max-model-len", "8192"),
                      env={"NCCL_DEBUG": "WARN", "PYTHONHASHSEED": "7"}, hash_seed="42")
    kv = flag(s, "--kv-transfer-config")
    events = flag(s, "--kv-events-config")
    assert s.argv == (
        "vllm", "serve", "meta-llama/Llama-3.1-8B", "--served-model-name", "llama8b",
        "--host", HOST, "--port", "8200", "--block-size", "16", "--gpu-memory-utilization", "0.9",
        "--enable-prefix-caching", "--prefix-caching-hash-algo", "sha256_cbor",
        "--kv-transfer-config", kv, "--kv-events-config", events,
        "--middleware", "meshd.node_agent.vllm_scorer.ConfidenceScorer",
        "--max-model-len", "8192")
    assert json.loads(events or "") == {
        "enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:8201",
        "replay_endpoint": "tcp://*:8202", "topic": "kv-events"}
    assert dict(s.env) == {"VLLM_NO_USAGE_STATS": "1", "NCCL_DEBUG": "WARN",
                           "PYTHONHASHSEED": "42", "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                           "CUDA_VISIBLE_DEVICES": "0"}
    assert s.health_url == f"http://{HOST}:8200/health"
    w = s.worker
    assert (w.endpoint, w.model, w.engine, w.kv_block_size, w.gpu_indices) == (
        f"http://{HOST}:8200", "llama8b", "vllm", 16, (0,))
    assert (w.kv_events_endpoint, w.kv_events_replay_endpoint, w.kv_transfer_endpoint) == (
        f"tcp://{HOST}:8201", f"tcp://{HOST}:8202", f"tcp://{HOST}:8203")


@pytest.mark.parametrize(("kw", "n_gpus", "gpus", "tp_flag"), [
    ({"both": 4}, 4, [(0,), (1,), (2,), (3,)], None),
    ({"prefill": 1, "decode": 1, "tensor_parallel_size": 4}, 8, [(0, 1, 2, 3), (4, 5, 6, 7)], "4"),
    ({"decode": 1, "tensor_parallel_size": 2, "gpus": (6, 3, 5)}, 8, [(3, 5)], "2"),
    ({"prefill": 2, "decode": 1, "tensor_parallel_size": 2}, 6, [(0, 1), (2, 3), (4, 5)], "2"),
])
def test_gpu_groups_and_tensor_parallel(kw: dict[str, Any], n_gpus: int,
                                        gpus: list[tuple[int, ...]], tp_flag: str | None) -> None:
    specs = make_specs(n_gpus, **kw)
    assert [s.worker.gpu_indices for s in specs] == gpus
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == [",".join(map(str, g)) for g in gpus]
    assert {flag(s, "--tensor-parallel-size") for s in specs} == {tp_flag}


@pytest.mark.parametrize("transport", ["tcp", "shm", "nccl", "cuda_ipc", "auto"])
def test_connector_transport_reaches_the_connector(transport: str) -> None:
    specs = make_specs(4, prefill=1, decode=1, kv_transfer=transport)
    assert [flag_json(s, "--kv-transfer-config")["kv_connector_extra_config"]["transport"]
            for s in specs] == [transport, transport]
    assert [s.worker.kv_transfer_endpoint for s in specs] == [
        f"{transport}://{HOST}:8203", f"{transport}://{HOST}:8213"]


@pytest.mark.parametrize(("transport", "visible"), [
    ("tcp", ["0,1", "2,3", "4,5"]),
    ("nccl", ["0,1", "2,3", "4,5"]),
    ("cuda_ipc", ["0,1,2,3,4,5", "2,3,0,1,4,5", "4,5,0,1,2,3"]),  # own first, then the rest
    ("auto", ["0,1,2,3,4,5", "2,3,0,1,4,5", "4,5,0,1,2,3"]),  # may pick cuda_ipc
])
def test_cuda_ipc_workers_see_every_agent_gpu(transport: str, visible: list[str]) -> None:
    specs = make_specs(8, prefill=1, decode=2, tensor_parallel_size=2, kv_transfer=transport)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == visible
    assert [s.worker.gpu_indices for s in specs] == [(0, 1), (2, 3), (4, 5)]


def test_auto_passes_the_host_facts() -> None:
    from meshd.capabilities import Rdma

    cfg = VllmConfig(model="m", kv_secret_file=SECRET, prefill=1, decode=1, kv_transfer="auto")
    gpus = (Gpu(0, "H100", "GPU-0", 80 << 30, nvlink_peers=("x",)), Gpu(1, "H100", "GPU-1", 1))
    ib = (Rdma("mlx5_0", 1, "ACTIVE", "InfiniBand"),)
    p, d = vllm_specs(cfg, "n1", HOST, gpus, rdma=ib)
    extra = [flag_json(s, "--kv-transfer-config")["kv_connector_extra_config"] for s in (p, d)]
    assert [(e["transport"], e["rdma"], e["nvlink"]) for e in extra] == [
        ("auto", True, True), ("auto", True, False)]  # NVLink is per worker's GPUs
    down = (Rdma("mlx5_0", 1, "DOWN", "InfiniBand"),)
    (p, _) = vllm_specs(cfg, "n1", HOST, gpus, rdma=down)
    assert flag_json(p, "--kv-transfer-config")["kv_connector_extra_config"]["rdma"] is False
    (p,) = make_specs(0, prefill=1, device="cpu", block_size=32, kv_transfer="tcp")
    assert "rdma" not in flag_json(p, "--kv-transfer-config")["kv_connector_extra_config"]


@pytest.mark.parametrize("transport", ["nccl", "cuda_ipc"])
def test_gpu_transports_need_cuda(transport: str) -> None:
    with pytest.raises(ValueError, match=rf"vllm.kv_transfer: '{transport}' moves CUDA KV"):
        make_specs(0, both=1, device="cpu", block_size=32, kv_transfer=transport)


def test_ports_per_worker() -> None:
    specs = make_specs(prefill=1, decode=2, base_port=9000)
    assert [(s.worker.endpoint, s.worker.kv_transfer_endpoint, s.worker.kv_events_endpoint,
             s.worker.kv_events_replay_endpoint) for s in specs] == [
        (f"http://{HOST}:{b}", f"tcp://{HOST}:{b + 3}", f"tcp://{HOST}:{b + 1}",
         f"tcp://{HOST}:{b + 2}") for b in (9000, 9010, 9020)]
    assert [flag_json(s, "--kv-events-config")["endpoint"] for s in specs] == [
        "tcp://*:9001", "tcp://*:9011", "tcp://*:9021"]
    assert [flag_json(s, "--kv-transfer-config")["kv_connector_extra_config"]["port"]
            for s in specs] == [9003, 9013, 9023]


@pytest.mark.parametrize(("tp", "n_gpus", "bases"), [
    (1, 2, [9000, 9010]),
    (7, 14, [9000, 9010]),  # HTTP, events, replay + 7 KV listeners = 10 ports
    (8, 16, [9000, 9020]),  # 11 ports: the block grows to 20
])
def test_port_blocks_leave_room_for_every_tp_rank(tp: int, n_gpus: int, bases: list[int]) -> None:
    specs = make_specs(n_gpus, decode=2, base_port=9000, tensor_parallel_size=tp)
    assert [s.worker.endpoint for s in specs] == [f"http://{HOST}:{b}" for b in bases]
    last_kv_rank = [int(s.worker.kv_transfer_endpoint.rsplit(":", 1)[1]) + tp - 1 for s in specs]
    assert last_kv_rank[0] < bases[1]


@pytest.mark.parametrize(("kw", "scored"), [
    ({}, True),  # auto, with meshd's connector: meshd is importable in vLLM's environment
    ({"kv_connector": "nixl"}, False), ({"kv_connector": "none"}, False),
    ({"kv_connector": "none", "score_confidence": "on"}, True),
    ({"score_confidence": "off"}, False),
])
def test_the_confidence_scorer_is_added_where_meshd_is_installed(kw: dict[str, Any],
                                                                 scored: bool) -> None:
    (s,) = make_specs(both=1, **kw)
    assert (flag(s, "--middleware") == "meshd.node_agent.vllm_scorer.ConfidenceScorer") is scored
    assert ("--middleware" in s.argv) is scored


def test_a_bad_scorer_mode_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"vllm\.score_confidence"):
        make_specs(both=1, score_confidence="yes")


@pytest.mark.parametrize(("kw", "expected"), [
    ({}, []),
    ({"enable_expert_parallel": True}, ["--enable-expert-parallel"]),
    ({"enable_expert_parallel": True, "enable_eplb": True},
     ["--enable-expert-parallel", "--enable-eplb", "--eplb-config",
      '{"num_redundant_experts":0}']),
    ({"enable_expert_parallel": True, "enable_eplb": True, "eplb_window_size": 1000,
      "eplb_step_interval": 3000, "eplb_num_redundant_experts": 32},
     ["--enable-expert-parallel", "--enable-eplb", "--eplb-config",
      '{"num_redundant_experts":32,"step_interval":3000,"window_size":1000}']),
])
def test_moe_flags(kw: dict[str, Any], expected: list[str]) -> None:
    (s,) = make_specs(both=1, kv_events=False, kv_connector="none", **kw)
    tail = list(s.argv[s.argv.index("sha256_cbor") + 1:])
    assert tail == expected


def test_nixl_connector_and_venv_python(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    venv.mkdir()
    (s,) = make_specs(prefill=1, kv_connector="nixl", python=str(venv),
                      kv_connector_extra={"backends": "UCX"})
    assert s.argv[:5] == (str(venv / "bin" / "python"), "-m",
                          "vllm.entrypoints.openai.api_server", "--model",
                          "meta-llama/Llama-3.1-8B")
    assert flag_json(s, "--kv-transfer-config") == {
        "kv_connector": "NixlConnector", "kv_role": "kv_producer", "engine_id": "n1-vllm-p0",
        "kv_load_failure_policy": "recompute", "kv_connector_extra_config": {"backends": "UCX"}}
    assert (s.env["VLLM_NIXL_SIDE_CHANNEL_HOST"], s.env["VLLM_NIXL_SIDE_CHANNEL_PORT"]) == (
        HOST, "8203")
    assert s.worker.kv_transfer_endpoint == f"nixl://{HOST}:8203"


def test_cpu_device_runs_tensor_parallel_without_gpus() -> None:
    """vllm-cpu runs TP on CPU: no GPUs are assigned, the port block holds every rank."""
    specs = make_specs(0, prefill=1, decode=1, device="cpu", block_size=32,
                       tensor_parallel_size=2, base_port=9000)
    assert [flag(s, "--tensor-parallel-size") for s in specs] == ["2", "2"]
    assert [s.worker.gpu_indices for s in specs] == [(), ()]
    assert "CUDA_VISIBLE_DEVICES" not in specs[0].env


def test_no_connector_no_events_cpu_device() -> None:
    (s,) = make_specs(0, both=1, kv_connector="none", kv_events=False, device="cpu",
                      python="/opt/vllm/bin/python", block_size=32)
    assert "--kv-transfer-config" not in s.argv and "--kv-events-config" not in s.argv
    assert "--middleware" not in s.argv
    assert "CUDA_VISIBLE_DEVICES" not in s.env
    assert (s.worker.gpu_indices, s.worker.kv_events_endpoint, s.worker.kv_transfer_endpoint) == (
        (), "", "")
    assert s.argv[0] == "/opt/vllm/bin/python"


@pytest.mark.parametrize(("kw", "n_gpus", "msg"), [
    ({"both": 1, "model": ""}, 1, "vllm.model: required"),
    ({"prefill": -1}, 1, "vllm.prefill: must be in 0..64"),
    ({"both": 1, "device": "rocm"}, 1, "vllm.device"),
    ({"both": 1, "tensor_parallel_size": 0}, 1, "vllm.tensor_parallel_size: must be >= 1"),
    ({"both": 1, "gpu_memory_utilization": 1.5}, 1, "vllm.gpu_memory_utilization"),
    ({"both": 1, "kv_connector": "lmcache"}, 1, "vllm.kv_connector"),
    ({"both": 1, "kv_transfer": "udp"}, 1, "vllm.kv_transfer"),
    ({"both": 1, "device": "cpu", "block_size": 16}, 0, "vllm.block_size: must be a multiple "
                                                       "of 32 with device='cpu'"),
    ({"both": 1}, 0, r"offers 0 \[\] \(vllm-cpu: set device = 'cpu'\)"),
    ({"both": 1, "kv_load_failure_policy": "retry"}, 1, "vllm.kv_load_failure_policy"),
    ({"both": 1, "hash_seed": "random"}, 1, "vllm.hash_seed"),
    ({"both": 1, "enable_eplb": True}, 1, "vllm.enable_eplb: needs enable_expert_parallel"),
    ({"both": 1, "gpus": (0, 0)}, 1, "vllm.gpus: duplicate"),
    ({"both": 64, "base_port": 65000}, 64, "vllm.base_port: leaves no room"),
    ({"both": 1, "kv_secret_file": ""}, 1, "vllm.kv_secret_file: required"),
    ({"both": 3}, 2, r"vllm.tensor_parallel_size: 3 workers x 1 GPUs need 3 GPUs, this host "
                     r"offers 2 \[0, 1\]"),
    ({"both": 2, "tensor_parallel_size": 4}, 4, "need 8 GPUs"),
    ({"both": 1, "gpus": (1, 9)}, 4, r"vllm.gpus: GPU indices \[9\] not on this host"),
])
def test_config_and_placement_errors(kw: dict[str, Any], n_gpus: int, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        make_specs(n_gpus, **kw)


def test_no_workers_needs_nothing() -> None:
    assert vllm_specs(VllmConfig(), "n1", HOST, ()) == []


# --- the root config's [vllm] section and the agent daemon's composition ----------------------

AGENT_TOML = """
[agent]
host = "10.0.0.5"
state_dir = "{state}"
[workers]
both = 1
base_port = 8100
[vllm]
model = "/models/tiny"
served_model_name = "tiny"
device = "cpu"
prefill = 1
decode = 1
block_size = 32
base_port = 8200
kv_connector_extra = {{ lease_timeout_s = "8" }}
extra_args = ["--max-model-len", "512"]
env = {{ OMP_NUM_THREADS = "1" }}
"""


def test_toml_vllm_section_builds_vllm_config(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(AGENT_TOML.format(state=tmp_path / "agent"))
    cfg = config.load(f, environ={"MESHD_VLLM_READY_TIMEOUT_S": "120"})
    assert cfg.vllm == VllmConfig(
        model="/models/tiny", served_model_name="tiny", device="cpu", prefill=1, decode=1,
        block_size=32, base_port=8200, kv_connector_extra={"lease_timeout_s": "8"},
        extra_args=("--max-model-len", "512"), env={"OMP_NUM_THREADS": "1"},
        ready_timeout_s=120.0)
    assert "vllm" in config.sections() and "kv_transfer" in config.sections()["vllm"]
    assert config.MeshConfig().vllm == VllmConfig()  # defaults: no vLLM workers


@pytest.mark.parametrize(("toml", "msg"), [
    ('[vllm]\nprefill = "two"', "vllm.prefill: expected an integer"),
    ("[vllm]\nboth = 1\nmodel = 'm'\nkv_transfer = 'rdma'",
     "vllm.kv_transfer: must be one of tcp, shm"),
    ("[vllm]\nboth = 1\nmodel = 'm'\nhash_seed = '7'",
     r"vllm.hash_seed: must equal gateway.hash_seed \('0'\)"),
    ("[vllm]\nboth = 1\nmodel = 'm'\nbase_port = 8100\n[workers]\nboth = 2",
     r"vllm.base_port: ports 8200..8209 overlap|vllm.base_port: ports 8100..8109 overlap"),
    ("[vllm]\nbogus = 1", "vllm.bogus: unknown field"),
])
def test_root_config_errors_name_vllm_fields(tmp_path: Path, toml: str, msg: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(toml)
    with pytest.raises(config.ConfigError, match=msg):
        config.load(f, environ={})


def test_seeds_agree_by_default_and_together() -> None:
    assert config.GatewayConfig().hash_seed == VllmConfig().hash_seed == "0"
    cfg = config.build(config.MeshConfig, {"gateway": {"hash_seed": "7"}, "vllm": {
        "model": "m", "both": 1, "hash_seed": "7"}}, "")
    assert cfg.vllm.hash_seed == cfg.gateway.hash_seed == "7"


def test_daemon_composes_embedded_and_vllm_workers(tmp_path: Path) -> None:
    from meshd.node_agent import daemon

    f = tmp_path / "agent.toml"
    f.write_text(AGENT_TOML.format(state=tmp_path / "agent"))
    cfg = config.load(f, environ={})
    sup = daemon.make_supervisor(cfg, Identity.generate(), gpus=())
    specs = [st.spec for st in sup.states.values()]
    node = next(iter(sup.states)).rsplit("-", 1)[0]
    assert [(s.worker.worker_id, s.worker.engine, s.worker.role) for s in specs] == [
        (f"{node}-b0", "embedded", "both"), (f"{node}-vllm-p0", "vllm", "prefill"),
        (f"{node}-vllm-d1", "vllm", "decode")]
    secret = tmp_path / "agent" / "kv_secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    p, d = specs[1], specs[2]
    assert p.argv[:5] == ("vllm", "serve", "/models/tiny", "--served-model-name", "tiny")
    kv = flag_json(p, "--kv-transfer-config")
    assert kv["kv_connector_extra_config"] == {"transport": "tcp", "host": HOST, "port": 8203,
                                               "secret_file": str(secret), "lease_timeout_s": "8"}
    assert flag_json(d, "--kv-transfer-config")["kv_role"] == "kv_consumer"
    assert (d.worker.endpoint, d.worker.kv_events_endpoint, d.worker.kv_events_replay_endpoint,
            d.worker.kv_block_size, d.worker.model) == (
        f"http://{HOST}:8210", f"tcp://{HOST}:8211", f"tcp://{HOST}:8212", 32, "tiny")
    assert d.env["PYTHONHASHSEED"] == cfg.gateway.hash_seed == "0"
    assert "CUDA_VISIBLE_DEVICES" not in d.env and d.env["OMP_NUM_THREADS"] == "1"
    # the node's worker token: every worker demands it and reports it; vLLM reads it from
    # its environment (never the command line, which any local user can read)
    token_file = tmp_path / "agent" / "worker_token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    assert len(token) == 64 and all(s.worker.api_token == token for s in specs)
    assert specs[0].argv[specs[0].argv.index("--api-key-file") + 1] == str(token_file)
    assert p.env["VLLM_API_KEY"] == d.env["VLLM_API_KEY"] == token
    assert not any(token in a for s in specs for a in s.argv)
    again = daemon.make_supervisor(cfg, Identity.generate(), gpus=())  # a restart keeps it
    assert {st.spec.worker.api_token for st in again.states.values()} == {token}
    assert sup.ready_workers() == ()  # reported only once healthy


def test_daemon_without_gpus_names_the_fix(tmp_path: Path) -> None:
    from meshd.node_agent import daemon

    cfg = config.build(config.MeshConfig, {"agent": {"state_dir": str(tmp_path)}, "vllm": {
        "model": "m", "decode": 1}}, "")
    with pytest.raises(ValueError, match=r"need 1 GPUs, this host offers 0 .*device = 'cpu'"):
        daemon.make_supervisor(cfg, Identity.generate(), gpus=())


# --- live: the real Supervisor runs vllm-cpu from a spec built here -------------------------

ROOT = Path(__file__).resolve().parents[2]
VLLM_VENV = ROOT / ".venv-vllm"
CPU_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "DO_NOT_TRACK": "1"}
SETTLE_S = 10.0
CPU_ARGS = ("--dtype", "bfloat16", "--max-model-len", "512", "--max-num-seqs", "4",
            "--enforce-eager", "--num-gpu-blocks-override", "32")


def make_tiny_llama(out: Path) -> Path:
    path = ROOT / "scripts" / "make_tiny_model.py"
    mod_spec = importlib.util.spec_from_file_location("make_tiny_model", path)
    assert mod_spec and mod_spec.loader
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return Path(mod.build("llama", out, seed=0))


def free_base_port() -> int:
    """A base port whose four worker ports are free on loopback right now."""
    for _ in range(50):
        base = random.randrange(20000, 60000, 10)
        socks = []
        try:
            for k in range(4):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + k))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def http(method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method=method)
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.vllm
@pytest.mark.skipif(not (VLLM_VENV / "bin" / "python").exists(), reason="no .venv-vllm")
@pytest.mark.timeout(600)
async def test_live_supervisor_runs_vllm_cpu(tmp_path: Path) -> None:
    import zmq

    pytest.importorskip("transformers")
    model = make_tiny_llama(tmp_path / "models")
    cfg = VllmConfig(model=str(model), served_model_name="tiny-llama", python=str(VLLM_VENV),
                     device="cpu", both=1, base_port=free_base_port(), block_size=32,
                     gpu_memory_utilization=0.15, kv_connector="none", env=CPU_ENV,
                     extra_args=CPU_ARGS, ready_timeout_s=400)
    (spec,) = vllm_specs(cfg, "live", "127.0.0.1", ())
    w = spec.worker
    sup = Supervisor([spec], tmp_path / "logs")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        await sup.start()
        ok = await sup.wait_ready(420)
        assert ok, (tmp_path / "logs" / f"{w.worker_id}.log").read_text()[-4000:]
        assert sup.ready_workers() == (w,)
        models = await asyncio.to_thread(http, "GET", w.endpoint + "/v1/models")
        assert [m["id"] for m in models["data"]] == ["tiny-llama"]
        sub.setsockopt(zmq.SUBSCRIBE, b"kv-events")
        sub.connect(w.kv_events_endpoint)  # vLLM binds tcp://*:port; we connect to the report
        await asyncio.sleep(1.0)  # let the subscription reach the publisher
        prompt = list(range(4, 4 + 2 * cfg.block_size + 3))
        body = await asyncio.to_thread(http, "POST", w.endpoint + "/v1/completions", {
            "model": "tiny-llama", "prompt": prompt, "max_tokens": 4, "temperature": 0.0})
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 4
        assert await asyncio.to_thread(sub.poll, 30_000), "no KV event on the reported endpoint"
        topic, seq, _payload = sub.recv_multipart()
        assert topic == b"kv-events" and len(seq) == 8
    finally:
        sub.close(linger=0)
        ctx.term()
        proc = sup.states[w.worker_id].proc
        pgid = proc.pid if proc is not None else 0  # the current group (start_new_session)
        await sup.stop(grace_s=15)
        # stop() returns when the group leader (the API server) has exited; vLLM's orphaned
        # children (engine core, multiprocessing resource tracker) got the same SIGTERM and are
        # gone about a second later. Allow them a bounded window; a survivor after it fails.
        settle = time.monotonic() + SETTLE_S
        while pgid and group_alive(pgid) and time.monotonic() < settle:
            await asyncio.sleep(0.05)
        if pgid and group_alive(pgid):  # never leave vLLM behind, even if stop() misbehaved
            os.killpg(pgid, signal.SIGKILL)
            pytest.fail(f"process group {pgid} alive {SETTLE_S:.0f}s after Supervisor.stop()")
    assert pgid and not group_alive(pgid)


# --- gateway prompts for vLLM workers: the model's chat template ------------------------------

def test_model_chat_template_matches_transformers(tmp_path: Path) -> None:
    """With `chat_template` in tokenizer_config.json, HFTokenizer renders the model's template
    (what vLLM does); the tiny model's template differs from meshd's built-in one."""
    transformers = pytest.importorskip("transformers")
    from meshd.node_agent.engine.tokenizer import HFTokenizer, _chat_text

    path = ROOT / "scripts" / "make_tiny_model.py"
    mod_spec = importlib.util.spec_from_file_location("make_tiny_model", path)
    assert mod_spec and mod_spec.loader
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    mod.build_tokenizer(tmp_path)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi!"}]
    tok = HFTokenizer(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for gen in (True, False):
        want = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
        if isinstance(want, dict) or hasattr(want, "input_ids"):  # BatchEncoding (newer HF)
            want = want["input_ids"]
        assert tok.apply_chat_template(messages, add_generation_prompt=gen) == list(want)
    assert tok.encode("hello world") == hf("hello world")["input_ids"]
    assert tok.apply_chat_template(messages) != tok.encode(_chat_text(messages, True))
    # Without a template: meshd's built-in chat text, as before.
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    plain = HFTokenizer(tmp_path)
    assert plain.chat_template is None
    assert plain.apply_chat_template(messages) == plain.encode(_chat_text(messages, True))
    with pytest.raises(ValueError, match="chat template: nope"):
        from meshd.node_agent.engine.tokenizer import ChatTemplate
        ChatTemplate("{{ raise_exception('nope') }}", {}).render(messages, True)


def test_a_vllm_worker_changes_role_by_its_kv_role() -> None:
    """`respec` (what the supervisor restarts a drained worker with): the slot's new id, the
    role's kv_role and engine_id in the connector config, nothing else changed; the
    operator's own (last) --kv-transfer-config is the one changed; None without one."""
    from meshd.node_agent.launcher import respec

    p, d = make_specs(prefill=1, decode=1)
    new = respec(d, "both")
    assert new is not None and new.worker.worker_id == "n1-vllm-b1"
    assert new.worker.role == "both" and new.worker.endpoint == d.worker.endpoint
    kv, old = flag_json(new, "--kv-transfer-config"), flag_json(d, "--kv-transfer-config")
    assert kv == {**old, "kv_role": "kv_both", "engine_id": "n1-vllm-b1"}
    changed = [i for i, (a, b) in enumerate(zip(new.argv, d.argv, strict=True)) if a != b]
    assert changed == [list(d.argv).index("--kv-transfer-config") + 1]
    assert new.env == d.env and new.health_url == d.health_url
    back = respec(new, "decode")
    assert back is not None and back.worker == d.worker and back.argv == d.argv
    mine = json.dumps({"kv_connector": "X", "kv_role": "kv_producer"})
    theirs = dataclasses.replace(p, argv=(*p.argv, "--kv-transfer-config", mine))
    moved = respec(theirs, "decode")
    assert moved is not None and json.loads(moved.argv[-1]) == {
        "kv_connector": "X", "kv_role": "kv_consumer", "engine_id": "n1-vllm-d0"}
    assert flag(moved, "--kv-transfer-config") == flag(p, "--kv-transfer-config")
    (plain,) = make_specs(both=1, kv_connector="none")
    assert respec(plain, "prefill") is None
