"""What the Ray dashboard shows of meshd, through its HTTP API (no browser): a Ray head of its
own with the dashboard and token auth, in a subprocess (scripts/dashboard_screenshot.py's
`--serve-actors` host: the registry, ledger and a gateway replica as `meshd up` deploys them),
stopped by closing its stdin. The shared test Ray has no dashboard, and one process gets one
`ray.init`."""

from __future__ import annotations

import importlib.util
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "dashboard_screenshot.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dashboard_screenshot", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModuleType, Any, str]]:
    script = load_script()
    proc, info = script.start_actors_host(tmp_path_factory.mktemp("dash"), export_ms=2000)
    try:
        yield script, info, Path(info["token_file"]).read_text().strip()
    finally:
        script.stop_host(proc)
        assert proc.returncode == 0  # it stopped its actors and its Ray


def test_the_dashboard_demands_the_token(host: tuple[ModuleType, Any, str]) -> None:
    script, info, _ = host
    with pytest.raises(urllib.error.HTTPError) as e:
        script.http_get(f"{info['dashboard']}/api/v0/actors")
    assert e.value.code == 401


def test_the_meshd_actors_show_with_readable_reprs(host: tuple[ModuleType, Any, str]) -> None:
    script, info, token = host
    actors = script.wait_for(lambda: (lambda a: a if len(a) == 3 else None)(
        script.meshd_actors(info["dashboard"], token)), 60, "meshd actors")
    by_name = {a["name"]: a for a in actors}
    assert sorted(by_name) == ["meshd-gateway-0", "meshd-ledger", "meshd-registry"]
    gateway_port = info["gateway"].rsplit(":", 1)[1]
    assert by_name["meshd-gateway-0"]["repr"].startswith(
        f"meshd gateway replica 0 of 1: OpenAI API on 127.0.0.1:{gateway_port}, own metrics "
        "http://127.0.0.1:")
    assert by_name["meshd-registry"]["repr"].startswith("meshd registry: control plane 127.0.0.1:")
    assert by_name["meshd-ledger"]["repr"] == (
        f"meshd fleet ledger: {Path(info['token_file']).parent / 'ledger.db'}")


def test_meshd_figures_are_exported_through_ray_metrics(
        host: tuple[ModuleType, Any, str]) -> None:
    script, info, token = host

    def series() -> list[str] | None:
        lines = [script.short_series(s) for s in script.ray_meshd_series(info["dashboard"],
                                                                          token)]
        want = ("ray_meshd_gateway_in_flight{actor=meshd-gateway-0}",
                "ray_meshd_workers{actor=meshd-registry,role=decode}")
        return lines if all(any(ln.startswith(w) for ln in lines) for w in want) else None

    lines = script.wait_for(series, 60, "ray_meshd_* series", period_s=2.0)
    assert "ray_meshd_gateway_workers{actor=meshd-gateway-0,health=healthy} 0.0" in lines
    assert "ray_meshd_fleet_ledger_meters{actor=meshd-ledger} 0.0" in lines

