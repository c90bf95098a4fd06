"""Shared fixtures: one Ray instance per test session, free loopback ports, temp state dirs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Ray's auth mode is always explicit: unset, a local ray.init() writes ~/.ray/auth_token.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """One local Ray instance shared by every test that needs it; shut down at the end."""
    import ray

    ctx = ray.init(namespace="meshd-test", include_dashboard=False, num_cpus=2,
                   log_to_driver=False, configure_logging=False)
    try:
        yield ctx
    finally:
        ray.shutdown()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    return d


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Opt-in suites: `gpu` needs CUDA, `vllm` needs MESHD_VLLM=1, `slow` needs MESHD_SLOW=1."""
    gpu = False
    try:
        import torch

        gpu = bool(torch.cuda.is_available())
    except ImportError:
        pass
    skips = {
        "gpu": (not gpu, "needs a CUDA GPU"),
        "vllm": (os.environ.get("MESHD_VLLM") != "1", "set MESHD_VLLM=1 (needs .venv-vllm)"),
        "slow": (os.environ.get("MESHD_SLOW") != "1", "set MESHD_SLOW=1"),
    }
    for item in items:
        for mark, (skip, why) in skips.items():
            if skip and item.get_closest_marker(mark) is not None:
                item.add_marker(pytest.mark.skip(reason=why))
