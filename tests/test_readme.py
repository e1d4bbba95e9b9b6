"""The README as a new user runs it: every Python snippet of "Using it" runs as written (with local paths),
and the README's test command passes on a machine without nvcc."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def _python_blocks(markdown: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of every fenced ```python block."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M):
        blocks.append((markdown.count("\n", 0, match.start()) + 1, match.group(1)))
    return blocks


README_BLOCKS = _python_blocks((REPO / "README.md").read_text(encoding="utf-8"))


def test_the_readme_has_its_python_snippets():
    assert len(README_BLOCKS) >= 3, "the README's 'Using it' snippets are gone (or no longer ```python blocks)"


@pytest.fixture(scope="module")
def main_job_dir(tmp_path_factory):
    """A directory laid out as after the main job: bitnet-kjv/packed holds a (tiny, random) packed model + tokenizer."""
    from test_gguf_helpers import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("readme")
    make_tiny_checkpoint(root / "bitnet-kjv" / "packed", form="packed")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("line, code", README_BLOCKS, ids=[f"README.md:{line}" for line, _ in README_BLOCKS])
def test_every_readme_python_snippet_runs_as_written(line, code, main_job_dir):
    """Each snippet alone, in a fresh interpreter, unchanged (issue 15 item 15): no undefined names, no hub."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    completed = subprocess.run([sys.executable, "-c", code], cwd=main_job_dir, capture_output=True, text=True,
                               env=env, timeout=900)
    assert completed.returncode == 0, f"README.md line {line}:\n{code}\n{completed.stderr[-3000:]}"
