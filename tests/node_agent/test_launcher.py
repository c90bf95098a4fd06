import stat
from pathlib import Path

import pytest

from meshd.config import ConfigError, WorkersConfig, load
from meshd.node_agent.launcher import embedded_specs, ensure_secret


def test_specs_ports_roles_and_reports(tmp_path: Path) -> None:
    secret = ensure_secret(tmp_path / "kv_secret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert len(bytes.fromhex(secret.read_text().strip())) == 32
    specs = embedded_specs(WorkersConfig(prefill=1, decode=2, base_port=9000), "n-1",
                           "127.0.0.1", secret)
    assert [(s.worker.worker_id, s.worker.role) for s in specs] == [
        ("n-1-p0", "prefill"), ("n-1-d1", "decode"), ("n-1-d2", "decode")]
    d1 = specs[1]
    assert d1.worker.endpoint == "http://127.0.0.1:9010"
    assert d1.health_url == "http://127.0.0.1:9010/health"
    assert d1.worker.kv_events_endpoint == "tcp://127.0.0.1:9012"
    assert d1.worker.kv_events_replay_endpoint == "tcp://127.0.0.1:9013"
    argv = list(d1.argv)
    assert argv[argv.index("--role") + 1] == "decode"
    assert argv[argv.index("--kv-port") + 1] == "9011"
    assert argv[argv.index("--kv-secret-file") + 1] == str(secret)
    assert ensure_secret(secret).read_text() == secret.read_text()  # not rewritten


def test_engine_cli_accepts_the_launcher_flags(tmp_path: Path) -> None:
    import argparse

    from meshd.node_agent.engine.worker_config import add_serve_flags, from_args

    secret = ensure_secret(tmp_path / "s")
    spec = embedded_specs(WorkersConfig(decode=1), "n-1", "127.0.0.1", secret)[0]
    p = argparse.ArgumentParser()
    add_serve_flags(p)
    cfg = from_args(p.parse_args(list(spec.argv[spec.argv.index("serve") + 1:])))
    assert (cfg.role, cfg.port, cfg.engine_id) == ("decode", 8100, "n-1-d0")
    assert cfg.attest_key == ""


def test_workers_attest_with_the_node_key(tmp_path: Path) -> None:
    """Receipts (issue 12 §2): the agent launches its workers with the node's own key, which
    they sign their outputs with; a key file others can read stops the worker at start."""
    import argparse
    import os

    from meshd.node_agent import identity
    from meshd.node_agent.engine.worker_config import add_serve_flags, from_args

    ident = identity.load_or_create(tmp_path)
    secret = ensure_secret(tmp_path / "s")
    spec = embedded_specs(WorkersConfig(decode=1), ident.node_id, "127.0.0.1", secret,
                          key_file=ident.path)[0]
    p = argparse.ArgumentParser()
    add_serve_flags(p)
    args = p.parse_args(list(spec.argv[spec.argv.index("serve") + 1:]))
    assert from_args(args).attest_key == str(ident.path)
    assert ident.path is not None
    os.chmod(ident.path, 0o644)
    with pytest.raises(ValueError, match="--attest-key-file: refusing key file"):
        from_args(args)


@pytest.mark.parametrize(("env", "msg"), [
    ({"MESHD_WORKERS_PREFILL": "-1"}, "workers.prefill"),
    ({"MESHD_WORKERS_KV_TRANSFER": "udp"}, "workers.kv_transfer"),
    ({"MESHD_WORKERS_DECODE": "64", "MESHD_WORKERS_BASE_PORT": "65000"}, "workers.base_port"),
])
def test_workers_config_errors(env: dict[str, str], msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        load(environ=env)


def test_expert_placement_becomes_report_records() -> None:
    from meshd.capabilities import Experts
    from meshd.node_agent.launcher import embedded_experts

    cfg = WorkersConfig(prefill=1, decode=2, moe=True, model_name="meshd-tiny-moe",
                        experts=("*", "0-3", "4+5+6+7"))
    records = embedded_experts(cfg, "n-1")
    layers = 4  # the built-in tiny MoE model
    assert records == tuple(r for layer in range(layers) for r in (
        Experts("meshd-tiny-moe", "n-1-d1", layer, (0, 1, 2, 3)),
        Experts("meshd-tiny-moe", "n-1-d2", layer, (4, 5, 6, 7))))  # the `*` worker: none
    assert embedded_experts(WorkersConfig(decode=1, moe=True), "n-1") == ()


@pytest.mark.parametrize(("kw", "msg"), [
    ({"decode": 2, "experts": ("0-3", "4-7")}, "workers.experts: needs an MoE model"),
    ({"decode": 2, "moe": True, "experts": ("*",)}, r"one entry per worker \(2\), got 1"),
    ({"decode": 1, "moe": True, "experts": ("0-x",)}, r"workers.experts\[0\]: expected"),
    ({"decode": 1, "moe": True, "experts": ("3-1",)}, r"workers.experts\[0\]: bad range"),
])
def test_expert_placement_config_errors(kw: dict[str, object], msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        WorkersConfig(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("experts", "msg"), [
    (("0-3", "4-6"), r"experts \[7\] are hosted by no worker"),
    (("0-3", "4-9"), r"n-1-d1: experts \[8, 9\] outside 0..7"),
])
def test_expert_placement_checked_against_the_model(experts: tuple[str, ...], msg: str) -> None:
    from meshd.node_agent.launcher import embedded_experts

    with pytest.raises(ValueError, match=msg):
        embedded_experts(WorkersConfig(decode=2, moe=True, experts=experts), "n-1")


def test_expert_placement_from_the_env_form() -> None:
    cfg = load(environ={"MESHD_WORKERS_DECODE": "2", "MESHD_WORKERS_MOE": "true",
                        "MESHD_WORKERS_EXPERTS": "0+1+2+3,4-7"})
    assert cfg.workers.experts == ("0+1+2+3", "4-7")
