"""csrc/cpu/work_sharing.h (the decode engine's chunk sharing with stealing), checked on its own: a small C++
program takes the chunks of thousands of phases of random sizes from many threads with random delays and counts
how often each chunk was taken (exactly once, always). Built with the same C++ compiler as the extension."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMPILER = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


@pytest.mark.skipif(COMPILER is None, reason="no C++ compiler")
@pytest.mark.parametrize("threads", [2, 3, 8])
def test_every_chunk_is_taken_exactly_once(tmp_path, threads):
    exe = tmp_path / "work_sharing_stress"
    subprocess.run(
        [COMPILER, "-std=c++17", "-O2", "-fopenmp", f"-I{REPO / 'csrc' / 'cpu'}",
         str(REPO / "tests" / "native" / "work_sharing_stress.cpp"), "-o", str(exe)],
        check=True, capture_output=True, text=True,
    )
    done = subprocess.run([str(exe), str(threads), "3000"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("0 errors"), done.stdout
