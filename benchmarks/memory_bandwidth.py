"""Same-run memory read bandwidth: the denominator of every benchmark's "physical limit" ratio.

A GEMV kernel is judged by the fraction of the machine's read bandwidth it reaches, so the bandwidth must be the
fastest read the machine can do, or the ratio flatters the kernel. PyTorch's streaming reads differ: on the 2-core
development machine a float32 ``sum`` reads about 21 GB/s while ``torch.dot`` of the two halves of the same tensor
(two read streams per thread, the BLAS kernel) reads about 29 GB/s. Each probe below is timed (best of
``repeats``) over a tensor far larger than the caches, and the best is the bandwidth; every probe's figure is kept
for the record.

Used as a sibling module by the benchmark scripts (``python benchmarks/bench_*.py`` puts this folder on
``sys.path``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

#: The probe tensor: far larger than any last-level cache on the machines we measure (L3 up to ~300 MiB).
DEFAULT_PROBE_BYTES = 512 * 2**20


def _best_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Shortest wall time of ``fn`` over ``repeats`` calls (after one warm-up call), synchronising on CUDA."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def read_probes_gbs(
    nbytes: int = DEFAULT_PROBE_BYTES, repeats: int = 5, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Read bandwidth (GB/s) of each streaming-read probe over one ``nbytes`` float32 tensor.

    ``sum``: one reduction over the whole tensor; ``dot``: the dot product of its two halves (two streams).
    """
    device = torch.device(device)
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    half = x.numel() // 2
    probes: dict[str, Callable[[], object]] = {
        "sum": lambda: x.sum(),
        "dot": lambda: torch.dot(x[:half], x[half : 2 * half]),
    }
    sizes = {"sum": x.numel() * 4, "dot": 2 * half * 4}
    return {name: sizes[name] / _best_seconds(fn, repeats, device) / 1e9 for name, fn in probes.items()}


def read_bandwidth_gbs(
    nbytes: int = DEFAULT_PROBE_BYTES, repeats: int = 5, device: torch.device | str = "cpu"
) -> tuple[float, dict[str, float]]:
    """(best read bandwidth in GB/s, every probe's figure): the machine's streaming-read limit, measured now."""
    probes = read_probes_gbs(nbytes, repeats, device)
    return max(probes.values()), probes
