#!/usr/bin/env bash
# Competitor proxies for benchmarks/gateway.py, kept out of the main venv:
#   sglang-router (Rust, PyPI `sglang-router`) and the LiteLLM proxy (PyPI `litellm[proxy]`).
# Creates /work/main/.venv-bench (override with BENCH_VENV). Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BENCH_VENV:-.venv-bench}
test -x "$VENV/bin/python" || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# Each competitor installs on its own so one failing does not block the other.
"$VENV/bin/python" -m pip install -q sglang-router || echo "bench_env: sglang-router failed" >&2
"$VENV/bin/python" -m pip install -q 'litellm[proxy]' || echo "bench_env: litellm[proxy] failed" >&2
"$VENV/bin/python" -m pip list 2>/dev/null | grep -iE '^(sglang-router|litellm) ' || true
