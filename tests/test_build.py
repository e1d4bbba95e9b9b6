"""The extension build helper: cached JIT builds, source hashing, and a clear fallback when building fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bitnet_torch import _build, ops

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not ops.extension_loaded(), reason="the extension is not loaded in this process")
def test_second_build_reuses_the_cached_library_without_compiling():
    loaded = _build.loaded_library_path()
    if loaded is None or loaded.name.startswith("_C"):
        pytest.skip("the ahead-of-time module is in use, not a JIT build")
    start = time.perf_counter()
    path = _build.build_extension(with_cuda=False)
    elapsed = time.perf_counter() - start
    assert path == loaded, f"the cache resolved to {path}, the process loaded {loaded}"
    assert elapsed < 1.0, f"an up-to-date build took {elapsed:.2f}s (it must not run the compiler)"


def test_build_name_follows_source_contents(tmp_path):
    root = _build.source_dir()
    assert root is not None, "csrc/ not found next to the package"
    copy = tmp_path / "csrc"
    shutil.copytree(root, copy)
    sources = _build.extension_sources(copy, with_cuda=False)
    name = _build._build_name(copy, sources, with_cuda=False)
    assert name == _build._build_name(copy, sources, with_cuda=False)
    header = copy / "cpu" / "kernel_api.h"
    header.write_text(header.read_text() + "\n// changed\n")
    assert _build._build_name(copy, sources, with_cuda=False) != name, "a header change must invalidate the cache"
    assert _build._build_name(copy, sources, with_cuda=True) != _build._build_name(copy, sources, with_cuda=False)


def test_cuda_sources_only_with_cuda():
    root = _build.source_dir()
    cpu_only = _build.extension_sources(root, with_cuda=False)
    assert all(p.suffix == ".cpp" and "cuda" not in p.parts for p in cpu_only)
    assert root / "ops.cpp" in cpu_only
    with_cuda = _build.extension_sources(root, with_cuda=True)
    assert set(cpu_only) <= set(with_cuda)


def test_cuda_request_follows_environment(monkeypatch):
    monkeypatch.setenv(_build.WITH_CUDA_ENV, "0")
    assert _build.cuda_build_requested() is False
    monkeypatch.setenv(_build.WITH_CUDA_ENV, "1")
    assert _build.cuda_build_requested() is True


def test_no_ext_environment_variable_is_a_reason(monkeypatch):
    monkeypatch.setenv(_build.NO_EXT_ENV, "1")
    assert _build.load_extension() == "BITNET_TORCH_NO_EXT=1 is set"


def test_missing_compiler_falls_back_with_a_reason_instead_of_crashing(tmp_path):
    script = (
        "import json, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import bitnet_torch\n"
        "print(json.dumps({'info': bitnet_torch.backend_info(), 'warnings': [str(w.message) for w in caught]}))\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), _build.BUILD_DIR_ENV: str(tmp_path / "cache")}
    env.pop(_build.NO_EXT_ENV, None)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    if out["info"]["backend"] == "extension":
        pytest.skip("an ahead-of-time build is installed; the JIT path was not exercised")
    assert out["info"]["backend"] == "fallback"
    assert "no C++ compiler" in out["info"]["reason"]
    assert sum("fallback" in w for w in out["warnings"]) == 1
