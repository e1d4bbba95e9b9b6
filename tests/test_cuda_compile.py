"""The CUDA kernels compile, register, and their logic is right -- checked without a GPU.

Two kinds of tests, both need ``nvcc`` (``CUDA_HOME``, ``/usr/local/cuda`` or PATH) and are skipped with the
reason when it is missing:

* ``test_cuda_extension_*``: build the whole extension (``csrc/ops.cpp``, ``csrc/cpu``, ``csrc/cuda``) with
  nvcc for sm_80 and sm_90 into a temporary directory, then load the library in a fresh interpreter and check
  that every op has a CUDA kernel. They need a CUDA build of torch (``.ci/cuda_compile.sh`` creates a virtual
  environment with one) and are skipped under a CPU build.
* ``test_host_*``: compile ``csrc/cuda/tests/host_harness.cu`` (the kernels' ``__host__ __device__`` building
  blocks, no torch) and run the kernels' arithmetic, tile loaders, 2-bit decoding, dp4a accumulation and
  fragment / output mapping on the CPU against the pure-PyTorch reference. Work with any torch.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _standalone_module(relative_path: str):
    """Import one torch-only module of the package by path, without ``bitnet_torch/__init__`` (which pulls in
    transformers and the extension loader): the CUDA compile venv holds only torch, ninja, pytest, numpy."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(f"_bitnet_standalone_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pack_ternary = _standalone_module("bitnet_torch/packing.py").pack_ternary
_quant = _standalone_module("bitnet_torch/quant.py")
quantize_activation, quantize_weight = _quant.quantize_activation, _quant.quantize_weight
CUDA_SOURCES = REPO / "csrc" / "cuda"
HARNESS = CUDA_SOURCES / "tests" / "host_harness.cu"
#: Architectures every CUDA build must compile for (A100 and H100/H200).
ARCHS = "8.0;9.0"
OPS = (
    "quantize_activation", "ternary_matmul", "ternary_linear", "ternary_linear_group", "quantize_pack_weight", "int8_linear"
)


def _cuda_home() -> Path | None:
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return Path(candidate)
    nvcc = shutil.which("nvcc")
    return Path(nvcc).resolve().parent.parent if nvcc else None


CUDA_HOME = _cuda_home()
#: Set by .ci/cuda_compile.sh: there, a missing nvcc or a CPU build of torch is an error, not a skip.
if os.environ.get("BITNET_REQUIRE_CUDA_COMPILE") == "1" and (CUDA_HOME is None or not torch.version.cuda):
    raise RuntimeError(
        f"BITNET_REQUIRE_CUDA_COMPILE=1 but nvcc={CUDA_HOME} and torch {torch.__version__} (CUDA {torch.version.cuda})"
    )
needs_nvcc = pytest.mark.skipif(CUDA_HOME is None, reason="no nvcc found (set CUDA_HOME or install the CUDA toolkit)")
needs_cuda_torch = pytest.mark.skipif(
    not torch.version.cuda,
    reason=f"torch {torch.__version__} is a CPU build; .ci/cuda_compile.sh runs this test with a CUDA build of torch",
)


# ------------------------------------------------------------------------------------------ full extension build


@pytest.fixture(scope="module")
def cuda_library(tmp_path_factory) -> Path:
    """Build the extension with CUDA for sm_80 and sm_90 (in a subprocess, so nothing is loaded here)."""
    build_dir = tmp_path_factory.mktemp("bitnet_cuda_build")
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=ARCHS, CUDA_HOME=str(CUDA_HOME), BITNET_TORCH_NO_EXT="1")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
    script = (  # _build.py by path: see _standalone_module
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('bitnet_build', {str(REPO / 'bitnet_torch' / '_build.py')!r})\n"
        "build = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(build)\n"
        f"print(build.build_extension(with_cuda=True, build_dir={str(build_dir)!r}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"building the CUDA extension failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    library = Path(result.stdout.strip().splitlines()[-1])
    assert library.is_file(), f"the build reported {library}, which does not exist"
    return library


@needs_nvcc
@needs_cuda_torch
def test_cuda_extension_builds_for_sm80_and_sm90(cuda_library: Path) -> None:
    """Every CUDA translation unit was compiled (and ptxas-assembled) for both architectures."""
    ninja_file = (cuda_library.parent / "build.ninja").read_text()
    for arch in ("80", "90"):
        flag = f"-gencode=arch=compute_{arch},code=sm_{arch}"
        assert flag in ninja_file, f"{flag} missing from the nvcc command line in {cuda_library.parent / 'build.ninja'}"
    objects = sorted(p.name for p in cuda_library.parent.glob("*.cuda.o"))
    expected = sorted(f"{p.stem}.cuda.o" for p in CUDA_SOURCES.glob("*.cu"))
    assert objects == expected, f"CUDA objects {objects} != sources {expected}"


@needs_nvcc
@needs_cuda_torch
def test_cuda_extension_registers_every_op_for_cuda(cuda_library: Path) -> None:
    """Loading the library (no GPU needed) registers a CUDA and a CPU kernel for each of the six kernel ops."""
    script = (
        "import sys, torch\n"
        f"torch.ops.load_library({str(cuda_library)!r})\n"
        f"for op in {OPS!r}:\n"
        "    for key in ('CUDA', 'CPU'):\n"
        "        if not torch._C._dispatch_has_kernel_for_dispatch_key('bitnet::' + op, key):\n"
        "            sys.exit(f'bitnet::{op} has no {key} kernel')\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


# ------------------------------------------------------------------------------------------ host-side harness


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> ctypes.CDLL:
    out = tmp_path_factory.mktemp("bitnet_cuda_harness") / "libbitnet_cuda_harness.so"
    cmd = [str(CUDA_HOME / "bin" / "nvcc"), "-O2", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-o", str(out), str(HARNESS)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"compiling {HARNESS.name} failed:\n{result.stdout}\n{result.stderr}"
    lib = ctypes.CDLL(str(out))
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.bitnet_host_quantize_rows.argtypes = [ptr, i64, i64, ptr, ptr]
    lib.bitnet_host_pack.argtypes = [ptr, i64, i64, ctypes.c_float, ptr]
    lib.bitnet_host_epilogue.argtypes = [ctypes.c_int32, ctypes.c_float, ctypes.c_float, i32, ctypes.c_float]
    lib.bitnet_host_epilogue.restype = ctypes.c_float
    lib.bitnet_host_plan_gemv.argtypes = [i64, i64, i64, ptr]
    lib.bitnet_host_plan_gemv.restype = i32
    lib.bitnet_host_gemv.argtypes = [i32, i32, ptr, i64, i64, i64, ptr, i64, i32, ptr]
    lib.bitnet_host_gemv.restype = i32
    lib.bitnet_host_gemm.argtypes = [i32, ptr, i64, i64, i32, i64, ptr, i64, i32, ptr]
    return lib


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _aligned16(a: np.ndarray) -> bool:
    return a.ctypes.data % 16 == 0


def _random_ternary(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)


def _random_codes(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    codes = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int16).to(torch.int8)
    if m > 1:
        codes[m // 2] = 0  # an all-zero token
    return codes


def _exact_product(codes: torch.Tensor, w_t: torch.Tensor) -> np.ndarray:
    return (codes.to(torch.int64) @ w_t.to(torch.int64).t()).to(torch.int32).numpy()


@needs_nvcc
def test_host_activation_quantizer_matches_reference_bit_for_bit(harness) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(257, 333, generator=gen) * torch.logspace(-6, 3, 257).unsqueeze(1)
    x[3] = 0.0  # all-zero token: scale 1e-5 / 127, codes 0
    x[4, :5] = torch.tensor([127.0, 0.5, -0.5, 1.5, -2.5])  # exact ties: round half to even
    x[5, 7] = -1e-3  # the -128 clamp boundary cannot be hit from |x| <= absmax, but negative max is
    # non-finite tokens (the reference: NaN -> scale NaN, +-inf -> scale inf, codes 0), at the first, a middle
    # and the last position (lanes 0, 5 and 12 of the warp's strided loop), with and without the other kind
    x[6, 0], x[7, 166], x[8, 332] = float("nan"), float("nan"), float("nan")
    x[9, 0], x[10, 166], x[11, 332] = float("inf"), -float("inf"), float("inf")
    x[12, 5], x[12, 200] = float("inf"), float("nan")
    x[13, :100] = float("nan")
    xs = x.numpy().copy()
    codes = np.zeros(xs.shape, dtype=np.int8)
    scales = np.zeros(xs.shape[0], dtype=np.float32)
    harness.bitnet_host_quantize_rows(_ptr(xs), xs.shape[0], xs.shape[1], _ptr(codes), _ptr(scales))
    ref_codes, ref_scales = quantize_activation(x)
    mismatch = np.argwhere(codes != ref_codes.numpy())
    assert mismatch.size == 0, f"codes differ at {mismatch[:5].tolist()}"
    ref = ref_scales.reshape(-1).numpy()
    np.testing.assert_array_equal(np.isnan(scales), np.isnan(ref))
    finite = ~np.isnan(ref)
    assert np.isnan(ref[[6, 7, 8, 12, 13]]).all() and np.isinf(ref[[9, 10, 11]]).all()
    np.testing.assert_array_equal(scales[finite].view(np.int32), ref[finite].view(np.int32))


@needs_nvcc
def test_host_weight_packer_matches_reference_bit_for_bit(harness) -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(48, 37, generator=gen)
    w_t, scale = quantize_weight(w)
    w[0, :4] = torch.tensor([0.5, -0.5, 1.5, -1.5]) * scale  # ties at the rounding boundary
    w_t, scale = quantize_weight(w)
    ws = w.numpy().copy()
    packed = np.zeros((12, 37), dtype=np.uint8)
    harness.bitnet_host_pack(_ptr(ws), 48, 37, ctypes.c_float(float(scale)), _ptr(packed))
    np.testing.assert_array_equal(packed, pack_ternary(w_t).numpy())


@needs_nvcc
def test_host_epilogue_matches_reference_order_of_operations(harness) -> None:
    gen = torch.Generator().manual_seed(2)
    acc = torch.randint(-(2**20), 2**20, (4096,), generator=gen, dtype=torch.int32)
    xs = torch.rand(4096, generator=gen) * 0.1
    ws = torch.tensor(0.0371)
    bias = torch.randn(4096, generator=gen)
    ref = acc.float() * (xs * ws) + bias
    got = np.array(
        [harness.bitnet_host_epilogue(int(a), float(s), float(ws), 1, float(b)) for a, s, b in zip(acc, xs, bias)],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(got.view(np.int32), ref.numpy().view(np.int32))


@needs_nvcc
def test_host_decode_plan_fits_shared_memory_and_covers_every_token(harness) -> None:
    plan = np.zeros(3, dtype=np.int64)
    for m in range(1, 17):
        for k in (1, 100, 2560, 6912, 30000):
            ok = harness.bitnet_host_plan_gemv(m, k, 227 * 1024, _ptr(plan))
            tile, tiles, smem = plan.tolist()
            assert ok == 1, f"no decode plan for M={m}, K={k}"
            assert tile in (1, 2, 4, 8) and tile * tiles >= m and (tiles - 1) * tile < m
            assert smem <= 227 * 1024
    assert harness.bitnet_host_plan_gemv(17, 64, 227 * 1024, _ptr(plan)) == 0, "M=17 belongs to the GEMM"
    assert harness.bitnet_host_plan_gemv(1, 10**6, 227 * 1024, _ptr(plan)) == 0, "K too long for shared memory"
    assert harness.bitnet_host_plan_gemv(16, 30000, 48 * 1024, _ptr(plan)) == 1 and plan[0] == 1


@needs_nvcc
@pytest.mark.parametrize("fmt", ["ternary", "int8"])
@pytest.mark.parametrize(("m", "k", "n"), [(1, 4, 4), (3, 100, 12), (8, 33, 20), (16, 2560, 36), (5, 257, 8), (2, 640, 4)])
def test_host_decode_kernel_logic_is_exact(harness, fmt: str, m: int, k: int, n: int) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    codes = _random_codes(m, k, gen)
    if fmt == "ternary":
        w_t = _random_ternary(n, k, gen)
        weight = pack_ternary(w_t).numpy().copy()
    else:
        n += 1 if n % 4 == 0 else 0  # int8 rows: N need not divide by 4
        w_t = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int16).to(torch.int8)
        weight = w_t.numpy().view(np.uint8).copy()
    c = codes.numpy().copy()
    expected = _exact_product(codes, w_t)
    for tile in (1, 2, 4, 8):
        out = np.full((m, n), -7, dtype=np.int32)
        aligned = int(_aligned16(weight) and k % 16 == 0)
        assert harness.bitnet_host_gemv(0 if fmt == "ternary" else 1, tile, _ptr(c), m, k, k, _ptr(weight), n, aligned, _ptr(out))
        bad = np.argwhere(out != expected)
        assert bad.size == 0, f"tile {tile}: outputs differ at (token, row) {bad[:5].tolist()}"


@needs_nvcc
@pytest.mark.parametrize("fmt", ["ternary", "int8"])
@pytest.mark.parametrize(("m", "k", "n", "pad_codes"), [(17, 64, 128, False), (130, 100, 136, True), (40, 200, 12, False), (3, 32, 260, True)])
def test_host_tensor_core_kernel_logic_is_exact(harness, fmt: str, m: int, k: int, n: int, pad_codes: bool) -> None:
    """Tile loaders, ternary decode into shared memory, fragments (via the PTX mma definition), output map."""
    gen = torch.Generator().manual_seed(m + k + n)
    codes = _random_codes(m, k, gen)
    if fmt == "ternary":
        w_t = _random_ternary(n, k, gen)
        weight = pack_ternary(w_t).numpy().copy()
    else:
        n += 3
        w_t = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int16).to(torch.int8)
        weight = w_t.numpy().view(np.uint8).copy()
    ldq = (k + 15) // 16 * 16 if pad_codes else k
    c = np.zeros((m, ldq), dtype=np.int8)
    c[:, :k] = codes.numpy()
    out = np.full((m, n), -7, dtype=np.int32)
    harness.bitnet_host_gemm(
        0 if fmt == "ternary" else 1, _ptr(c), m, ldq, int(_aligned16(c)), k, _ptr(weight), n, int(_aligned16(weight)), _ptr(out)
    )
    bad = np.argwhere(out != _exact_product(codes, w_t))
    assert bad.size == 0, f"outputs differ at (token, feature) {bad[:5].tolist()}"


def _check_random_linear(harness, fmt: str, m: int, k: int, n: int, seed: int, kernel: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    codes = _random_codes(m, k, gen)
    if fmt == "ternary":
        w_t = _random_ternary(n, k, gen)
        weight = pack_ternary(w_t).numpy().copy()
    else:
        w_t = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int16).to(torch.int8)
        weight = w_t.numpy().view(np.uint8).copy()
    c = codes.numpy().copy()
    out = np.full((m, n), -7, dtype=np.int32)
    fmt_id = 0 if fmt == "ternary" else 1
    if kernel == "gemv":
        aligned = int(_aligned16(weight) and k % 16 == 0)
        assert harness.bitnet_host_gemv(fmt_id, 8, _ptr(c), m, k, k, _ptr(weight), n, aligned, _ptr(out))
    else:
        harness.bitnet_host_gemm(fmt_id, _ptr(c), m, k, int(_aligned16(c)), k, _ptr(weight), n, int(_aligned16(weight)), _ptr(out))
    bad = np.argwhere(out != _exact_product(codes, w_t))
    assert bad.size == 0, f"{kernel} {fmt} M={m} K={k} N={n}: outputs differ at {bad[:5].tolist()}"


@needs_nvcc
def test_host_kernels_are_exact_on_random_shapes(harness) -> None:
    """Hypothesis over shapes: both kernels' logic, both weight formats, any K, aligned or not."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
    @hypothesis.given(
        fmt=st.sampled_from(["ternary", "int8"]),
        kernel=st.sampled_from(["gemv", "gemm"]),
        m=st.integers(1, 40),
        k=st.integers(1, 200),
        quarter_n=st.integers(1, 40),
        odd_n=st.integers(0, 3),
        seed=st.integers(0, 2**16),
    )
    def check(fmt, kernel, m, k, quarter_n, odd_n, seed):
        if kernel == "gemv":
            m = min(m, 16)
        n = 4 * quarter_n + (odd_n if fmt == "int8" else 0)
        _check_random_linear(harness, fmt, m, k, n, seed, kernel)

    check()
