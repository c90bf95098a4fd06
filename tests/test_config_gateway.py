"""The `[gateway]` config tree: sections, nested env vars, moved fields, routing profiles."""

from pathlib import Path

import pytest

from meshd.config import ConfigError, load
from meshd.coordinator.gateway.runtime import make_router
from meshd.scheduler.prefix_index import PrefixIndex
from meshd.scheduler.types import RequestView, Role, WorkerView

TREE = '''
[gateway]
port = 8100
[gateway.http]
max_body_bytes = 65536
[gateway.deadlines]
total_s = 40
inter_token_s = 3
[gateway.limits]
max_n = 8
[gateway.routing]
decode = "by-load"
failure_backoff_s = 2
[gateway.routing.pd]
min_uncached_tokens = 64
[gateway.routing.profiles.by-load]
filters = ["health", "model", {type = "role", role = "decode"}]
scorers = [{type = "load", weight = 1.0}]
picker = "max"
'''


def test_sections_compose_and_each_component_reads_its_own(tmp_path: Path) -> None:
    f = tmp_path / "meshd.toml"
    f.write_text(TREE)
    g = load(f, environ={}).gateway
    assert (g.port, g.http.max_body_bytes, g.deadlines.total_s, g.deadlines.inter_token_s,
            g.limits.max_n, g.routing.failure_backoff_s, g.routing.pd.min_uncached_tokens) == (
        8100, 65536, 40.0, 3.0, 8, 2.0, 64)
    assert g.handler_timeout_s == 40.0 + g.http.handler_grace_s
    router = make_router(g.routing, PrefixIndex())
    assert router.decode.name == "by-load"
    busy = WorkerView("a", Role.DECODE, "m", num_waiting=5)
    idle = WorkerView("b", Role.DECODE, "m")
    d = router.decide(RequestView("r", "m", 8, ()), [busy, idle])
    assert d.decode == "b"


def test_nested_sections_from_the_environment(tmp_path: Path) -> None:
    g = load(environ={"MESHD_GATEWAY_DEADLINES_TOTAL_S": "12",
                      "MESHD_GATEWAY_ROUTING_PD_MIN_UNCACHED_TOKENS": "0",
                      "MESHD_GATEWAY_HTTP_KEEPALIVE_TIMEOUT_S": "5"}).gateway
    assert (g.deadlines.total_s, g.routing.pd.min_uncached_tokens,
            g.http.keepalive_timeout_s) == (12.0, 0, 5.0)


@pytest.mark.parametrize(("toml", "message"), [
    ("[gateway]\ntotal_timeout_s = 5\n",
     "gateway.total_timeout_s: moved to gateway.deadlines.total_s"),
    ("[gateway]\npd_min_uncached_tokens = 0\n",
     "moved to gateway.routing.pd.min_uncached_tokens"),
    ("[gateway.deadlines]\ntotal_s = 0\n", "gateway.deadlines.total_s: must be > 0"),
    ("[gateway.limits]\nmax_n = 1000\n", "gateway.limits.max_n: must be in 0..128"),
    ("[gateway.http]\nbody_timeout_s = -1\n", "gateway.http.body_timeout_s: must be > 0"),
    ("[gateway.routing]\ndecode = \"nope\"\n", "gateway.routing.decode: unknown profile 'nope'"),
    ("[gateway.routing.profiles.bad]\nscorers = [{type = \"nope\"}]\n",
     "gateway.routing.profiles.bad: unknown scorer 'nope'"),
    ("[gateway.routing.pd]\ncolocate_cached_fraction = 2\n",
     "gateway.routing.pd.colocate_cached_fraction: must be in"),
    ("[gateway.deadlines]\nbogus = 1\n", "gateway.deadlines.bogus: unknown field"),
])
def test_errors_name_the_field(tmp_path: Path, toml: str, message: str) -> None:
    f = tmp_path / "meshd.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load(f, environ={})
