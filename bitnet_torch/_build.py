"""Finds, JIT-compiles and loads the bitnet C++/CUDA extension that backs ``torch.ops.bitnet``.

Order of preference in :func:`load_extension`:

1. ``BITNET_TORCH_NO_EXT=1`` → no extension (the caller falls back to the pure-PyTorch reference).
2. A module built ahead of time by ``BITNET_TORCH_BUILD_EXT=1 pip install .`` (``bitnet_torch/_C*.so``).
3. A JIT build of the sources (``csrc/`` next to the package in a checkout, else the copy shipped as package
   data in ``bitnet_torch/_csrc``), compiled once with ninja into a cache directory whose name hashes the
   sources, the flags and the torch version; later imports load the cached library directly (no compiler run).

CUDA sources (``csrc/cuda``) are compiled in when a CUDA build of torch sees a GPU and nvcc is found, or
when ``BITNET_TORCH_WITH_CUDA=1`` (``=0`` disables them). A failed CUDA build is retried CPU-only.
Nothing here raises at import: :func:`load_extension` returns the reason the extension is unavailable.
:func:`build_extension` (which does raise) is the reusable entry point for tests and ``setup.py``.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

__all__ = [
    "NO_EXT_ENV",
    "WITH_CUDA_ENV",
    "BUILD_DIR_ENV",
    "CXX_FLAGS",
    "LD_FLAGS",
    "CUDA_FLAGS",
    "source_dir",
    "extension_sources",
    "cuda_build_requested",
    "build_extension",
    "load_extension",
    "loaded_library_path",
]

logger = logging.getLogger(__name__)

#: Set to 1 to skip the compiled extension entirely (pure-PyTorch fallback).
NO_EXT_ENV = "BITNET_TORCH_NO_EXT"
#: 1 forces the CUDA sources into the build (even without a GPU: compile checks), 0 leaves them out.
WITH_CUDA_ENV = "BITNET_TORCH_WITH_CUDA"
#: Root of the JIT build cache (default: ``$XDG_CACHE_HOME/bitnet_torch/extensions``).
BUILD_DIR_ENV = "BITNET_TORCH_BUILD_DIR"

#: Host compiler flags. No -march: the SIMD files select their ISA with target pragmas and are dispatched at
#: run time. -ffp-contract=off keeps the epilogue's multiply and add unfused (bit-exact with the reference).
#: -fopenmp: at::parallel_for is a header template; without OpenMP in *our* translation units it runs serially.
CXX_FLAGS: list[str] = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
#: Linker flags (libgomp, the OpenMP runtime PyTorch's CPU build uses as well).
LD_FLAGS: list[str] = ["-fopenmp"]
#: nvcc flags; --fmad=false for the same reason as -ffp-contract=off.
CUDA_FLAGS: list[str] = ["-O3", "--fmad=false", "-lineinfo"]

_PACKAGE_DIR = Path(__file__).resolve().parent
_AOT_MODULE_GLOB = "_C*.so"
_loaded_path: Path | None = None


def source_dir() -> Path | None:
    """The directory holding ``ops.cpp`` and ``cpu/`` (checkout first, then package data), or None."""
    for candidate in (_PACKAGE_DIR.parent / "csrc", _PACKAGE_DIR / "_csrc"):
        if (candidate / "ops.cpp").is_file() and (candidate / "cpu").is_dir():
            return candidate
    return None


def extension_sources(root: Path, with_cuda: bool) -> list[Path]:
    """The translation units of the extension: ``ops.cpp``, ``cpu/*.cpp`` and, with CUDA, ``cuda/*.cu|*.cpp``."""
    sources = [root / "ops.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    if with_cuda:
        sources += sorted((root / "cuda").glob("*.cu")) + sorted((root / "cuda").glob("*.cpp"))
    return sources


def _headers(root: Path, with_cuda: bool) -> list[Path]:
    """Headers the translation units may include (their changes must invalidate the cached build)."""
    folders = [root, root / "cpu"] + ([root / "cuda"] if with_cuda else [])
    return sorted(p for folder in folders for ext in ("*.h", "*.cuh", "*.hpp") for p in folder.glob(ext))


def _cuda_home() -> str | None:
    """CUDA toolkit root: ``CUDA_HOME``/``CUDA_PATH``, the directory of ``nvcc`` on PATH, or /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and Path(os.environ[var], "bin", "nvcc").exists():
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        return str(Path(nvcc).resolve().parent.parent)
    return "/usr/local/cuda" if Path("/usr/local/cuda/bin/nvcc").exists() else None


def cuda_build_requested() -> bool:
    """Whether the CUDA sources belong in the build (see the module docstring for the rules)."""
    forced = os.environ.get(WITH_CUDA_ENV)
    if forced is not None and forced.strip() != "":
        return forced.strip() not in ("0", "false", "False", "no")
    return bool(torch.version.cuda) and torch.cuda.is_available() and _cuda_home() is not None


def _build_name(root: Path, sources: list[Path], with_cuda: bool) -> str:
    digest = hashlib.sha256()
    for path in sorted(set(sources) | set(_headers(root, with_cuda))):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    for item in (*CXX_FLAGS, *LD_FLAGS, *CUDA_FLAGS, torch.__version__, sys.version, str(with_cuda)):
        digest.update(item.encode())
    return f"bitnet_torch_ext_{'cuda' if with_cuda else 'cpu'}_{digest.hexdigest()[:16]}"


def _default_build_root() -> Path:
    if os.environ.get(BUILD_DIR_ENV):
        return Path(os.environ[BUILD_DIR_ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "bitnet_torch" / "extensions"


def _call_with_known_kwargs(func, **kwargs):
    """Call a torch.utils.cpp_extension helper, passing only the arguments its signature has."""
    params = inspect.signature(func).parameters
    return func(**{k: v for k, v in kwargs.items() if k in params})


#: GPU architectures compiled for when no GPU is visible to pick them (override with TORCH_CUDA_ARCH_LIST).
DEFAULT_CUDA_ARCHS = "8.0;9.0"


class _CudaToolkit:
    """Temporarily point cpp_extension at a CUDA toolkit and at target architectures.

    A CPU build of torch leaves ``cpp_extension.CUDA_HOME`` unset, and without a GPU torch cannot pick the
    architectures; both are needed to compile the CUDA sources (e.g. compile-only checks on a CPU machine).
    """

    def __init__(self, with_cuda: bool) -> None:
        self.with_cuda = with_cuda
        self.saved_home = None
        self.set_arch_list = False

    def __enter__(self):
        from torch.utils import cpp_extension

        self.saved_home = cpp_extension.CUDA_HOME
        if not self.with_cuda:
            return self
        if cpp_extension.CUDA_HOME is None:
            home = _cuda_home()
            if home is None:
                raise RuntimeError("CUDA sources requested but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
            cpp_extension.CUDA_HOME = home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
            self.set_arch_list = True
        return self

    def __exit__(self, *exc) -> None:
        from torch.utils import cpp_extension

        cpp_extension.CUDA_HOME = self.saved_home
        if self.set_arch_list:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)


def build_extension(
    with_cuda: bool = False,
    build_dir: str | os.PathLike | None = None,
    verbose: bool = False,
    compile_only: bool = False,
) -> Path:
    """Compile the extension with ninja and return the path of the shared library (nothing is loaded).

    ``build_dir`` defaults to a per-source-hash directory under the cache root; an up-to-date library there
    is returned without running the compiler. ``compile_only`` compiles every translation unit but does not
    link (for checking CUDA sources on a machine whose torch has no CUDA libraries) and returns the build
    directory. Raises ``RuntimeError`` when the sources, the compiler or ninja are missing or the build fails
    (the message holds the compiler output).
    """
    from torch.utils import cpp_extension
    from torch.utils.file_baton import FileBaton

    root = source_dir()
    if root is None:
        raise RuntimeError("the C++ sources were not found (neither csrc/ in a checkout nor bitnet_torch/_csrc)")
    sources = extension_sources(root, with_cuda)
    if with_cuda and not any(p.suffix == ".cu" for p in sources):
        raise RuntimeError(f"CUDA build requested but {root / 'cuda'} holds no .cu sources")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler found ('{compiler}' is not on PATH; install g++ or set CXX)")

    name = _build_name(root, sources, with_cuda)
    directory = Path(build_dir) if build_dir is not None else _default_build_root() / name
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"{name}.so"
    done_marker = directory / ("objects.done" if compile_only else "library.done")
    if done_marker.exists() and (compile_only or library.exists()):
        return directory if compile_only else library

    baton = FileBaton(str(directory / "lock"))
    if not baton.try_acquire():
        logger.info("waiting for another process that is building %s", directory)
        baton.wait()
        if done_marker.exists():
            return directory if compile_only else library
        raise RuntimeError(f"a concurrent build in {directory} failed; see its output")
    try:
        logger.info(
            "compiling the bitnet kernels (%s%s) into %s; this happens once per source change",
            "C++ + CUDA" if with_cuda else "C++",
            ", compile only" if compile_only else "",
            directory,
        )
        common = dict(
            name=name,
            sources=[str(p) for p in sources],
            extra_cflags=list(CXX_FLAGS),
            extra_cuda_cflags=list(CUDA_FLAGS),
            extra_sycl_cflags=[],
            extra_include_paths=[str(root), str(root / "cpu")],
            with_cuda=with_cuda,
            with_sycl=False,
            is_standalone=False,
            verbose=verbose,
        )
        with _CudaToolkit(with_cuda):
            if compile_only:
                _call_with_known_kwargs(
                    cpp_extension._write_ninja_file_to_build_library,
                    path=str(directory / "build.ninja"),
                    extra_ldflags=list(LD_FLAGS),
                    **common,
                )
                _run_ninja_objects(directory, verbose)
            else:
                _call_with_known_kwargs(
                    cpp_extension._write_ninja_file_and_build_library,
                    build_directory=str(directory),
                    extra_ldflags=list(LD_FLAGS),
                    **common,
                )
        if not compile_only and not library.exists():
            raise RuntimeError(f"the build finished but {library} is missing")
        done_marker.touch()
        logger.info("built %s", directory if compile_only else library)
        return directory if compile_only else library
    finally:
        baton.release()


def _run_ninja_objects(directory: Path, verbose: bool) -> None:
    """Run ninja on the object-file targets of ``build.ninja`` only (no link step)."""
    text = (directory / "build.ninja").read_text()
    objects = re.findall(r"^build ([^:\s]+\.o): (?:compile|cuda_compile)\b", text, flags=re.MULTILINE)
    if not objects:
        raise RuntimeError(f"no compile targets found in {directory / 'build.ninja'}")
    result = subprocess.run(
        ["ninja", "-v", *objects], cwd=directory, stdout=None if verbose else subprocess.PIPE, stderr=subprocess.STDOUT
    )
    if result.returncode != 0:
        output = result.stdout.decode(errors="replace") if result.stdout else ""
        raise RuntimeError(f"compiling the extension failed:\n{output}")


def _aot_library() -> Path | None:
    """The library built by ``BITNET_TORCH_BUILD_EXT=1 pip install .``, if any."""
    found = sorted(_PACKAGE_DIR.glob(_AOT_MODULE_GLOB))
    return found[0] if found else None


def _load(path: Path) -> None:
    global _loaded_path
    torch.ops.load_library(str(path))
    _loaded_path = path
    logger.info("loaded the bitnet kernels from %s", path)


def load_extension() -> str | None:
    """Load the compiled kernels into ``torch.ops.bitnet``; return None on success, else why they are unavailable.

    Never raises: every failure (no compiler, no ninja, a compile error, a library that does not load) becomes
    the returned reason, which says how to fix it.
    """
    if os.environ.get(NO_EXT_ENV, "").strip() not in ("", "0"):
        return f"{NO_EXT_ENV}={os.environ[NO_EXT_ENV]} is set"
    aot = _aot_library()
    if aot is not None:
        try:
            _load(aot)
            return None
        except Exception as exc:  # noqa: BLE001 - any loader failure means: try the JIT build instead
            logger.warning("the ahead-of-time build %s does not load (%s); trying a JIT build", aot, exc)
    try:
        with_cuda = cuda_build_requested() and bool(torch.version.cuda)
    except Exception as exc:  # noqa: BLE001
        logger.warning("could not decide whether to build CUDA kernels (%s); building CPU only", exc)
        with_cuda = False
    attempts = [True, False] if with_cuda else [False]
    reason = "unknown"
    for cuda in attempts:
        try:
            _load(build_extension(with_cuda=cuda))
            return None
        except Exception as exc:  # noqa: BLE001 - reported to the caller, which falls back
            reason = str(exc).strip()
            if cuda:
                logger.warning("building the CUDA kernels failed, retrying CPU only: %s", reason[-2000:])
    return (
        f"building the C++ extension failed: {reason[-2000:]} "
        f"(install a C++ compiler and ninja, or set {NO_EXT_ENV}=1 to silence this warning)"
    )


def loaded_library_path() -> Path | None:
    """Path of the loaded extension library (None when the fallback is in use)."""
    return _loaded_path
