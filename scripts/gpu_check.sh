#!/usr/bin/env bash
# On a CUDA machine: install meshd (no deps) beside the image's torch/cupy, run the GPU tests
# and the GPU KV transfer benchmark (the image must hold torch, msgpack and pytest; cupy for
# NCCL). Output (log, JSON) goes to ${OUT:-gpu-out}/.
#   bash scripts/gpu_check.sh            # after scripts/gpu_wheels.sh put wheels in .whl/
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
py=${PYTHON:-python3}
site=/tmp/meshd-site
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
  "gpus", torch.cuda.device_count(), "nccl", torch.cuda.nccl.version())'
  "$py" -c 'import cupy; from cupy.cuda import nccl; print("cupy", cupy.__version__,
  "nccl", nccl.get_version())' || echo "cupy: unavailable"
  if [ -d .whl ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" .whl/*.whl
  fi
  "$py" -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" . || exit 1
  export PYTHONPATH="$site"
  "$py" -m pytest -v -p no:cacheprovider -m gpu tests/gpu -rs
  echo "pytest exit: $?"
  "$py" benchmarks/kv_transfer_gpu.py --out "$out/kv_transfer_gpu.json"
  echo "benchmark exit: $?"
} 2>&1 | tee "$out/gpu_check.log"
