"""The float lm_head in decode: ``bitnet::float_linear`` against ``F.linear`` and the int8 head, same run.

On the 2B-4T head shape (N = 128256 vocabulary rows, K = 2560; 656 MB in bf16) and M = 1 and 4 tokens it
times (median of ``--repeats``):

* ``float_linear`` -- ``ops.float_linear`` (bf16 weight, bf16 x; the GEMV path this CPU selects);
* ``float_linear[path]`` -- the same forced onto every other supported GEMV path (``--all-paths``);
* ``F.linear bf16`` -- PyTorch's own bf16 linear (oneDNN on CPU);
* ``int8_linear`` -- ``ops.int8_linear`` on an int8 copy of the weight (half the bytes; different numbers);

and, in the same run, the memory bandwidth: the fastest streaming read of a large fp32 tensor
(``memory_bandwidth.py``: ``sum`` and ``dot`` probes) and ``copy`` of it (read + write, counted as both). Each row prints the weight bytes streamed per second and that as a
percentage of the measured read bandwidth, and the speed-up over ``F.linear``. CPU timings are noisy on a
shared machine: compare numbers from one run only.

    python benchmarks/bench_head.py --threads 2 --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from bitnet_torch import ops
from memory_bandwidth import read_bandwidth_gbs

HEAD_SHAPE = (128256, 2560)  # N x K of the BitNet b1.58 2B-4T lm_head
BANDWIDTH_BYTES = 512 * 2**20  # the fp32 tensor of the bandwidth check (bigger than any cache)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per measurement (median reported)")
    parser.add_argument("--m", default="1,4", help="comma-separated token counts (decode: <= 8)")
    parser.add_argument("--all-paths", action="store_true", help="also time every other GEMV path")
    return parser.parse_args()


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not ops.extension_loaded():
        raise SystemExit(f"the compiled kernels are unavailable ({ops.extension_error()}); nothing to measure")
    n, k = HEAD_SHAPE
    torch.manual_seed(0)
    w_bf16 = torch.randn(n, k, dtype=torch.bfloat16)
    w_int8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    w_scale = torch.rand(n) * 0.01
    big = torch.ones(BANDWIDTH_BYTES // 4)
    big_out = torch.empty_like(big)
    active = torch.ops.bitnet._float_gemv_isa("")
    paths = [p for p in torch.ops.bitnet._float_gemv_isa_available() if p != active and p != "scalar"]

    read_gbs, probes = read_bandwidth_gbs(BANDWIDTH_BYTES, args.repeats)
    copy_ms = median_ms(lambda: big_out.copy_(big), args.repeats)
    copy_gbs = 2 * BANDWIDTH_BYTES / copy_ms / 1e6
    print(f"threads={torch.get_num_threads()}  repeats={args.repeats}  head N={n} K={k}  GEMV path={active}")
    probe_text = ", ".join(f"{name} {value:.1f}" for name, value in probes.items())
    print(f"memory bandwidth (same run): read {read_gbs:.1f} GB/s (best of {probe_text}), "
          f"copy {copy_gbs:.1f} GB/s read+write")
    print(f"{'M':>3} {'kernel':<24} {'ms':>9} {'GB/s':>7} {'% of read':>9} {'vs F.linear':>12}")
    for m in [int(v) for v in args.m.split(",")]:
        x = torch.randn(m, k, dtype=torch.bfloat16)
        rows: list[tuple[str, float, int]] = [
            ("F.linear bf16", median_ms(lambda: F.linear(x, w_bf16), args.repeats), w_bf16.numel() * 2),
            (f"float_linear[{active}]", median_ms(lambda: ops.float_linear(x, w_bf16), args.repeats), w_bf16.numel() * 2),
        ]
        if args.all_paths:
            for path in paths:
                torch.ops.bitnet._float_gemv_isa(path)
                try:
                    rows.append((f"float_linear[{path}]", median_ms(lambda: ops.float_linear(x, w_bf16), args.repeats),
                                 w_bf16.numel() * 2))
                finally:
                    torch.ops.bitnet._float_gemv_isa("auto")
        rows.append(("int8_linear (int8 w)", median_ms(lambda: ops.int8_linear(x, w_int8, w_scale), args.repeats),
                     w_int8.numel()))
        baseline = rows[0][1]
        for name, ms, nbytes in rows:
            gbs = nbytes / ms / 1e6
            print(f"{m:>3} {name:<24} {ms:>9.2f} {gbs:>7.1f} {100 * gbs / read_gbs:>8.0f}% {baseline / ms:>11.2f}x")


if __name__ == "__main__":
    main()
