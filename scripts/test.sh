#!/usr/bin/env bash
# Runs the whole test suite from a fresh clone: creates .venv (once), installs the package and its test
# dependencies, runs pytest (JIT-building the CPU kernels on first use), then the CUDA compile-only check
# (.ci/cuda_compile.sh, a second venv with the CUDA build of torch: about 5.5 GB of disk, created on its first
# run; skipped with a one-line reason when there is no nvcc, or with BITNET_SKIP_CUDA_COMPILE=1).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# The CPU build of torch; an already-installed torch (e.g. a CUDA build) is kept.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,serve]"

python -m pytest tests "$@"
bash .ci/cuda_compile.sh
