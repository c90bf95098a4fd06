"""The fast fake OpenAI worker (benchmarks/fake_backend.py), importable from any test."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def load_fake_backend() -> Any:
    """The `benchmarks/fake_backend.py` module (loaded once per process)."""
    name = "meshd_bench_fake_backend"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "fake_backend.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]
