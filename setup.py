"""Package setup (metadata lives in pyproject.toml).

* A plain ``pip install .`` is pure Python: the C++ kernels are JIT-compiled with ninja on first use
  (bitnet_torch/_build.py), from ``csrc/`` in a checkout or from the copy this script ships as package data
  (``bitnet_torch/_csrc``).
* ``BITNET_TORCH_BUILD_EXT=1 pip install --no-build-isolation .`` compiles the kernels ahead of time into
  ``bitnet_torch/_C*.so`` (torch must already be installed, hence no build isolation); the CUDA sources are
  included when torch is a CUDA build and nvcc is found, or when ``BITNET_TORCH_WITH_CUDA=1``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
BUILD_EXT_ENV = "BITNET_TORCH_BUILD_EXT"


class BuildPyWithKernelSources(build_py):
    """build_py that also ships csrc/ as bitnet_torch/_csrc, so installed copies can JIT-compile the kernels."""

    def run(self) -> None:
        super().run()
        if self.dry_run or not CSRC.is_dir():
            return
        target = Path(self.build_lib) / "bitnet_torch" / "_csrc"
        shutil.copytree(CSRC, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("tests", "__pycache__", "*.o"))


def _build_settings():
    """bitnet_torch/_build.py loaded as a plain module (importing the package would trigger a JIT build)."""
    spec = importlib.util.spec_from_file_location("_bitnet_torch_build_settings", ROOT / "bitnet_torch" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions_and_commands():
    commands = {"build_py": BuildPyWithKernelSources}
    if os.environ.get(BUILD_EXT_ENV, "").strip() in ("", "0"):
        return [], commands
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        raise RuntimeError(
            f"{BUILD_EXT_ENV}=1 needs torch at build time: install torch first and use "
            "`pip install --no-build-isolation .`"
        ) from exc
    settings = _build_settings()
    with_cuda = settings.cuda_build_requested() or (
        bool(torch.version.cuda) and os.environ.get(settings.WITH_CUDA_ENV, "").strip() == "" and settings._cuda_home() is not None
    )
    sources = [str(p.relative_to(ROOT)) for p in settings.extension_sources(CSRC, with_cuda)]
    extension_class = CUDAExtension if with_cuda else CppExtension
    extension = extension_class(
        name="bitnet_torch._C",
        sources=sources,
        include_dirs=[str(CSRC), str(CSRC / "cpu")],
        extra_compile_args={"cxx": list(settings.CXX_FLAGS), "nvcc": list(settings.CUDA_FLAGS)},
        extra_link_args=list(settings.LD_FLAGS),
    )
    commands["build_ext"] = BuildExtension
    return [extension], commands


ext_modules, cmdclass = _extensions_and_commands()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
