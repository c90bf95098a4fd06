from pathlib import Path

import pytest

from meshd import config, env
from meshd.config import ConfigError, load


def test_defaults_are_valid() -> None:
    cfg = load(environ={})
    assert cfg.coordinator.grpc_port == 50151
    assert cfg.ray.namespace == "meshd"
    assert cfg.ray.auth_mode == "token" and cfg.ray.bind_host == "127.0.0.1"
    assert cfg.ray.dashboard_host == "127.0.0.1"


@pytest.mark.parametrize(("toml", "environ", "auth_mode", "bind_host"), [
    ("[ray]\nauth_mode = 'disabled'\nbind_host = '10.0.0.10'\n", {}, "disabled", "10.0.0.10"),
    ("[ray]\nbind_host = '10.0.0.10'\n", {"MESHD_RAY_BIND_HOST": "0.0.0.0",
                                           "MESHD_RAY_AUTH_MODE": "disabled"},
     "disabled", "0.0.0.0"),
    ("", {"MESHD_RAY_BIND_HOST": "::1"}, "token", "::1"),
    ("", {"MESHD_RAY_BIND_HOST": "localhost"}, "token", "localhost"),
    ("", {"MESHD_RAY_BIND_HOST": "fd00::10"}, "token", "fd00::10"),
])
def test_ray_auth_and_bind_host_from_file_and_env(tmp_path: Path, toml: str,
                                                  environ: dict[str, str], auth_mode: str,
                                                  bind_host: str) -> None:
    f = tmp_path / "meshd.toml"
    f.write_text(toml)
    cfg = load(f, environ=environ)
    assert (cfg.ray.auth_mode, cfg.ray.bind_host) == (auth_mode, bind_host)


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    f = tmp_path / "meshd.toml"
    f.write_text('[coordinator]\ngrpc_port = 7001\nsuspect_after_s = 9\n'
                 '[agent]\nattributes = { zone = "a" }\n')
    cfg = load(f, environ={})
    assert cfg.coordinator.grpc_port == 7001
    assert cfg.coordinator.suspect_after_s == 9.0
    assert cfg.agent.attributes == {"zone": "a"}
    cfg = load(f, environ={"MESHD_COORDINATOR_GRPC_PORT": "7002",
                           "MESHD_AGENT_ATTRIBUTES": "zone=b,privacy=high"})
    assert cfg.coordinator.grpc_port == 7002
    assert cfg.agent.attributes == {"zone": "b", "privacy": "high"}
    cfg = load(f, {"coordinator": {"grpc_port": 7003}},
               environ={"MESHD_COORDINATOR_GRPC_PORT": "7002"})
    assert cfg.coordinator.grpc_port == 7003


def test_config_file_from_env(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[ray]\nnamespace = 'other'\n")
    assert load(environ={"MESHD_CONFIG": str(f)}).ray.namespace == "other"


@pytest.mark.parametrize(("toml", "environ", "message"), [
    ("[coordinator]\ngrpc_port = 70000\n", {}, "coordinator.grpc_port: must be in 0..65535"),
    ("[coordinator]\ngrpc_port = 'x'\n", {}, "coordinator.grpc_port: expected an integer"),
    ("[coordinator]\ndead_after_s = 1\n", {}, "coordinator.dead_after_s: must be greater"),
    ("[coordinator]\nbogus = 1\n", {}, "coordinator.bogus: unknown field"),
    ("[nosuch]\nx = 1\n", {}, "nosuch: unknown field"),
    ("[ray]\nauth_mode = 'open'\n", {}, "ray.auth_mode: must be 'disabled' or 'token'"),
    ("[ray]\nbind_host = 'example.com'\n", {}, "ray.bind_host: must be 127.0.0.1"),
    ("", {"MESHD_RAY_BIND_HOST": "127.0.0.2"}, "ray.bind_host: must be 127.0.0.1"),
    ("", {"MESHD_RAY_BIND_HOST": ""}, "ray.bind_host: must be"),
    ("", {"MESHD_RAY_INCLUDE_DASHBOARD": "maybe"}, "ray.include_dashboard: expected a boolean"),
    ("", {"MESHD_AGENT_COORDINATOR": "nohostport"}, "agent.coordinator: must be host:port"),
    ("[coordinator\n", {}, "invalid TOML"),
])
def test_errors_name_the_field(tmp_path: Path, toml: str, environ: dict[str, str],
                               message: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load(f, environ=environ)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load("/nonexistent/meshd.toml", environ={})


def test_unknown_env_vars_are_reported() -> None:
    environ = {"MESHD_COORDINATOR_GRPC_PORT": "1", "MESHD_COORDINATR_X": "1"}
    assert env.unknown(config.sections(), environ) == ["MESHD_COORDINATR_X"]


def test_shipped_example_config_is_valid() -> None:
    root = Path(__file__).resolve().parent.parent
    cfg = load(root / "cluster" / "meshd.example.toml", environ={})
    assert cfg.ray.auth_mode == "token"
    assert cfg.agent.attributes["zone"] == "dc1-row4"
