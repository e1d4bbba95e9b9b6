"""The README as a new user runs it: every Python snippet of "Using it" runs as written (with local paths),
and the README's test command passes on a machine without nvcc."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_cuda_compile_check_skips_without_nvcc_and_creates_nothing(tmp_path):
    """scripts/test.sh ends with .ci/cuda_compile.sh: without nvcc it must exit 0 with a one-line reason."""
    venv = tmp_path / "venv-cuda"
    env = {**os.environ, "CUDA_HOME": str(tmp_path / "no-cuda"), "BITNET_CUDA_VENV": str(venv)}
    env.pop("BITNET_REQUIRE_CUDA_COMPILE", None)
    (tmp_path / "no-cuda").mkdir()
    completed = subprocess.run(["bash", str(REPO / ".ci" / "cuda_compile.sh")], capture_output=True, text=True,
                               env=env, timeout=60)
    assert completed.returncode == 0, completed.stderr
    lines = (completed.stdout + completed.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cuda_compile: skipped: no nvcc at "), lines
    assert not venv.exists(), "the 5.5 GB CUDA venv was created although nothing can be compiled"

    env["BITNET_REQUIRE_CUDA_COMPILE"] = "1"  # CI's CUDA job: a missing nvcc is a failure there
    completed = subprocess.run(["bash", str(REPO / ".ci" / "cuda_compile.sh")], capture_output=True, text=True,
                               env=env, timeout=60)
    assert completed.returncode == 1 and "FAILED: no nvcc" in completed.stderr
    assert not venv.exists()
