"""Issue 13 §1: the Ray cluster launcher configs in cluster/ray/ (`ray up`).

Each file is checked against the installed Ray's own launcher schema
(`ray/autoscaler/ray-schema.json`, with jsonschema) and prepared the way `ray up` prepares it
(`prepare_config` + `validate_config`; the local provider's whole offline bootstrap). Every
`meshd` command in them parses with meshd's CLI parser and loads its config; every `ray`
command with Ray's own click CLI. Where it runs here, it runs: the head's setup commands
(state dir, the Ray token, a join token for exactly the listed hosts, the previous one revoked)
and cluster/ray/install-agent.sh (into a DESTDIR) are executed, and the agent's resulting
environment loads as meshd's agent config.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.shell import commands

from meshd import cli, config
from meshd.coordinator.store import Store

ROOT = Path(__file__).resolve().parents[1]
RAY_DIR = ROOT / "cluster" / "ray"
CONFIGS = ("meshd-local.yaml", "meshd-aws.yaml")
COMMAND_LISTS = ("initialization_commands", "setup_commands", "head_setup_commands",
                 "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
INSTALLED_CONFIG = "/etc/meshd/meshd.toml"  # where setup_commands put cluster/ray/meshd.toml
MESHD = "/opt/meshd/.venv/bin/meshd"


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((RAY_DIR / name).read_text())
    return data


def all_commands(cfg: dict[str, Any]) -> list[str]:
    return [c for key in COMMAND_LISTS for c in cfg.get(key, [])]


def token_uses(cfg: dict[str, Any]) -> int:
    (argv,) = [a for c in cfg["head_setup_commands"] for a in commands(c, "meshd")
               if "token" in a]
    return int(argv[argv.index("--uses") + 1])


@pytest.mark.parametrize("name", CONFIGS)
def test_rays_schema_and_launcher_accept_it(name: str) -> None:
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load(name)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    prepared = prepare_config(copy.deepcopy(cfg))  # what `ray up` does first
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    for cmd in all_commands(cfg):
        assert "\n" not in cmd, cmd  # one shell line each, as the updater runs them


def test_the_local_provider_bootstraps_offline() -> None:
    """The local provider's whole `ray up` config bootstrap (no cloud call): one node type,
    every listed host a worker, and one join token use per host."""
    from ray.autoscaler._private import commands as ray_commands

    cfg = load("meshd-local.yaml")
    boot = ray_commands._bootstrap_config(copy.deepcopy(cfg), no_config_cache=True)
    (node_type,) = boot["available_node_types"].values()
    hosts = len(cfg["provider"]["worker_ips"])
    assert node_type["min_workers"] == node_type["max_workers"] == hosts
    assert token_uses(cfg) == hosts


def test_aws_enrolls_at_least_its_max_workers_and_runs_the_same_commands() -> None:
    local, aws = load("meshd-local.yaml"), load("meshd-aws.yaml")
    gpu = aws["available_node_types"]["gpu"]
    assert token_uses(aws) >= gpu["max_workers"] >= gpu["min_workers"] >= 1

    def normal(cfg: dict[str, Any]) -> list[str]:
        return [re.sub(r"--uses \d+ --ttl \d+", "--uses N --ttl T", c)
                for c in all_commands(cfg)]

    assert normal(local) == normal(aws)
    for key in ("file_mounts", "rsync_exclude", "cluster_synced_files"):
        assert local[key] == aws[key], key


@pytest.mark.parametrize("name", CONFIGS)
def test_every_meshd_and_ray_command_parses(name: str) -> None:
    from ray.scripts import scripts

    cfg = load(name)
    script = "\n".join(all_commands(cfg))
    argvs = commands(script, "meshd")
    assert {tuple(a[2:4]) for a in argvs} == {("trust", "revoke-token"), ("trust", "token"),
                                              ("coordinator", "start")}
    for argv in argvs:
        args = cli._parser().parse_args(argv)  # SystemExit on anything meshd would refuse
        assert args.config == INSTALLED_CONFIG
        mesh = config.load(RAY_DIR / "meshd.toml", cli.overrides(args), environ={})
        assert mesh.coordinator.state_dir == "~/meshd-state/coordinator"
    coord = next(cli._parser().parse_args(a) for a in argvs if "coordinator" in a)
    assert coord.ray_address == "auto"  # joins the Ray head `ray start --head` made
    rays = commands(script, "ray")
    assert [a[0] for a in rays] == ["stop", "start", "stop", "start"]
    for argv in rays:
        sub = scripts.cli.get_command(scripts.cli.make_context("ray", list(argv)), argv[0])
        params = sub.make_context(argv[0], list(argv[1:])).params  # click refuses a bad flag
        if argv[0] == "start":
            assert params["num_gpus"] == 0  # the GPUs are the agent's vLLM workers'
    head = next(c for c in cfg["head_start_ray_commands"] if "--head" in c)
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_TOKEN_PATH=$HOME/meshd-state/" \
        "coordinator/ray_auth_token" in head  # the token meshd sends (<state_dir>/ray_auth_token)
    assert "--dashboard-host=127.0.0.1" in head
    # workers join Ray once the head's gateway answers: every meshd actor placed on the head
    port = config.load(RAY_DIR / "meshd.toml", environ={}).gateway.port
    start = cfg["worker_start_ray_commands"]
    wait = start.index(f"until (exec 3<>/dev/tcp/$RAY_HEAD_IP/{port}) 2>/dev/null; do sleep 2; "
                       "done")
    assert wait < next(i for i, c in enumerate(start) if "ray start" in c)


def test_the_mesh_config_loads_and_the_agent_unit_reads_agent_env() -> None:
    mesh = config.load(RAY_DIR / "meshd.toml", environ={})
    assert (mesh.coordinator.grpc_host, mesh.gateway.host, mesh.ray.auth_mode) == (
        "0.0.0.0", "0.0.0.0", "token")
    assert mesh.vllm.count == 2 and mesh.vllm.kv_secret_file == "/etc/meshd/kv_secret"
    unit = (ROOT / "cluster" / "systemd" / "meshd-agent.service").read_text()
    assert "EnvironmentFile=-/etc/meshd/agent.env" in unit
    assert "--join-token" not in unit.split("ExecStart=")[1].splitlines()[0]


def run_head_setup(cfg: dict[str, Any], home: Path) -> None:
    """The head's setup commands as the launcher runs them (bash, the ssh user's HOME), with
    meshd from this checkout and the config from cluster/ray/."""
    for cmd in cfg["head_setup_commands"]:
        local = cmd.replace(MESHD, str(ROOT / ".venv" / "bin" / "meshd")).replace(
            INSTALLED_CONFIG, str(RAY_DIR / "meshd.toml"))
        out = subprocess.run(["bash", "-c", local], env={**os.environ, "HOME": str(home)},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (cmd, out.stdout, out.stderr)


def test_the_head_setup_runs(tmp_path: Path) -> None:
    cfg = load("meshd-local.yaml")
    home = tmp_path / "home"
    secrets = home / "meshd-secrets"  # the file mount of ~/.meshd-cluster
    secrets.mkdir(parents=True, mode=0o700)
    (secrets / "ray_auth_token").write_text("f" * 64)
    run_head_setup(cfg, home)
    state, join = home / "meshd-state" / "coordinator", home / "meshd-join" / "join_token"
    for path, mode in ((state, 0o700), (state / "ray_auth_token", 0o600), (join, 0o600)):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    first = join.read_text().strip()
    run_head_setup(cfg, home)  # `ray up` again: a new token, the old one revoked
    second = join.read_text().strip()
    assert first != second
    store = Store(state)
    try:
        tokens = {t.token_id: t for t in store.tokens()}
        assert [(t.max_uses, t.state(0), t.label) for t in tokens.values()] == [
            (2, "revoked", "ray-up"), (2, "active", "ray-up")]
        assert second.removeprefix("mjt_").partition(".")[0] in tokens
    finally:
        store.close()


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip")
def test_install_agent_writes_the_units_environment(tmp_path: Path) -> None:
    secrets, dest = tmp_path / "secrets", tmp_path / "root"
    secrets.mkdir()
    (secrets / "kv_secret").write_text("k" * 64 + "\n")
    token = tmp_path / "join_token"
    token.write_text("mjt_0123456789ab.secret\n")
    user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    env = {**os.environ, "DESTDIR": str(dest), "MESHD_USER": user, "SYSTEMCTL": "true"}
    script = RAY_DIR / "install-agent.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = subprocess.run([str(script), "127.0.0.1", str(secrets), str(token)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    agent_env = dest / "etc" / "meshd" / "agent.env"
    for path in (agent_env, dest / "etc" / "meshd" / "kv_secret"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert (dest / "etc/systemd/system/meshd-agent.service").read_text() == (
        ROOT / "cluster" / "systemd" / "meshd-agent.service").read_text()
    environ = dict(line.split("=", 1) for line in agent_env.read_text().splitlines())
    mesh = config.load(RAY_DIR / "meshd.toml", environ=environ)
    assert (mesh.agent.coordinator, mesh.agent.host, mesh.agent.join_token) == (
        "127.0.0.1:50151", "127.0.0.1", "mjt_0123456789ab.secret")
    token.write_text("not a token\n")
    bad = subprocess.run([str(script), "127.0.0.1", str(secrets), str(token)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "holds no join token" in bad.stderr
