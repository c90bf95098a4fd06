#!/usr/bin/env bash
# Download the pure/manylinux wheels the GPU check needs that a bare CUDA image lacks
# (Python 3.12, x86-64) into .whl/ (git-ignored). Run here, then carry .whl to the GPU machine
# and run scripts/gpu_check.sh there. The image is assumed to have torch, cupy, msgpack, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
py=${PYTHON:-python3}
for spec in pynacl==1.6.2 cffi==2.0.0 pycparser==2.23; do
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$spec"
done
ls -l .whl
