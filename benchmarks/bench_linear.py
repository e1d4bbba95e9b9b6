"""Packed ternary linear layers against every alternative, measured in the same run.

For each BitNet b1.58 2B-4T projection shape (K x N) and token count M it times (median of repeats):

* ``ours``      -- ``PackedBitLinear`` (torch.ops.bitnet.ternary_linear, bf16 in/out, 2-bit weights);
* ``fp32``      -- ``F.linear`` in fp32;         * ``bf16`` -- ``F.linear`` in bf16 (cuBLAS on CUDA);
* ``int_mm``    -- ``torch._int_mm`` on the unpacked int8 ternary weight (int8 activations given);
* ``hf_bitlinear`` -- Transformers' packed ``BitLinear`` (unpacks the weight on every call; repeats capped).

and prints the ratios (baseline time / ours) and the weight bytes each holds. It also measures the activation
quantizer against two plain float passes, and the decode GEMVs (ternary and the int8 lm_head) as a fraction of
the memory bandwidth measured in the same run. ``--json PATH`` writes every number for the ``bench`` CLI.

    python benchmarks/bench_linear.py --device cpu --threads 2
    python benchmarks/bench_linear.py --device cuda --m 1,8,128,512 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import bitnet_torch
from bitnet_torch import ops
from bitnet_torch.nn import PackedBitLinear

DEFAULT_SHAPES = "2560x3840,2560x2560,2560x6912,2560x13824,6912x2560"  # K x N: qkv, o, up, gate+up, down
DEFAULT_M = "1,8,128,512"
#: The 2B-4T lm_head (vocab x hidden).
HEAD_SHAPE = (128256, 2560)
#: A ternary matrix bigger than any cache (packed bytes ~ all 2B-4T projections), for the bandwidth check.
BIG_TERNARY_SHAPE = (4 * 204800, 2560)  # N x K -> 524 MB packed


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats per measurement (median reported)")
    parser.add_argument("--hf-repeats", type=int, default=3, help="repeats for Transformers' BitLinear (slow)")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated KxN list")
    parser.add_argument("--m", default=DEFAULT_M, help="comma-separated token counts")
    parser.add_argument("--skip-transformers", action="store_true", help="do not time Transformers' BitLinear")
    parser.add_argument("--skip-bandwidth", action="store_true", help="skip the GEMV bandwidth section")
    parser.add_argument("--json", default=None, help="write all results to this JSON file")
    return parser.parse_args()


# --------------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in milliseconds (device-synchronised)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------- layers


def make_weights(n: int, k: int, device: torch.device) -> dict[str, Any]:
    """One random float weight in every representation the methods hold."""
    w = torch.randn(n, k, device=device) * 0.02
    packed, scale = ops.quantize_pack_weight(w)
    w_t = bitnet_torch.unpack_ternary(packed, validate=False)
    return {"w_fp32": w, "w_bf16": w.bfloat16(), "packed": packed, "scale": scale, "w_int8": w_t}


def our_layer(weights: dict[str, Any], n: int, k: int, device: torch.device) -> PackedBitLinear:
    layer = PackedBitLinear(k, n, device=device, dtype=torch.bfloat16)
    layer.weight.copy_(weights["packed"])
    layer.weight_scale.copy_(weights["scale"].reshape(1))
    return layer.eval()


def transformers_layer(weights: dict[str, Any], n: int, k: int, device: torch.device):
    from transformers.integrations.bitnet import BitLinear

    layer = BitLinear(k, n, bias=False, device=device, dtype=torch.bfloat16)
    layer.weight.copy_(weights["packed"])
    layer.weight_scale.copy_(weights["scale"].reciprocal().reshape(1))  # "bitlinear": output divided by it
    return layer.eval()


def int_mm_rows(m: int, device: torch.device) -> int:
    """torch._int_mm needs M > 16 on CUDA; on CPU any M works."""
    return max(m, 17) if device.type == "cuda" else m


def bench_linear(k: int, n: int, ms: list[int], args, device: torch.device) -> list[dict[str, Any]]:
    weights = make_weights(n, k, device)
    ours = our_layer(weights, n, k, device)
    hf = None
    if not args.skip_transformers:
        try:
            hf = transformers_layer(weights, n, k, device)
        except Exception as exc:  # noqa: BLE001 - report and keep benchmarking the rest
            print(f"  transformers BitLinear unavailable: {exc}")
    weight_bytes = {
        "ours": weights["packed"].numel(),
        "fp32": weights["w_fp32"].numel() * 4,
        "bf16": weights["w_bf16"].numel() * 2,
        "int_mm": weights["w_int8"].numel(),
        "hf_bitlinear": weights["packed"].numel(),
    }
    w_int8_t = weights["w_int8"].t()
    rows = []
    for m in ms:
        x = torch.randn(m, k, device=device).bfloat16()
        x32 = x.float()
        x_q = torch.randint(-127, 128, (int_mm_rows(m, device), k), dtype=torch.int8, device=device)
        with torch.inference_mode():
            times = {
                "ours": median_ms(lambda: ours(x), device, args.repeats),
                "fp32": median_ms(lambda: F.linear(x32, weights["w_fp32"]), device, args.repeats),
                "bf16": median_ms(lambda: F.linear(x, weights["w_bf16"]), device, args.repeats),
                "int_mm": median_ms(lambda: torch._int_mm(x_q, w_int8_t), device, args.repeats),
            }
            if hf is not None:
                times["hf_bitlinear"] = median_ms(lambda: hf(x), device, args.hf_repeats, warmup=1)
        row = {
            "K": k,
            "N": n,
            "M": m,
            "ms": times,
            "speedup_vs": {name: times[name] / times["ours"] for name in times if name != "ours"},
            "weight_bytes": {name: weight_bytes[name] for name in times},
        }
        if device.type == "cuda" and x_q.shape[0] != m:
            row["note"] = f"int_mm timed with M={x_q.shape[0]} (cuBLASLt int8 needs M > 16)"
        rows.append(row)
        ratios = "  ".join(f"{name} x{ratio:.2f}" for name, ratio in row["speedup_vs"].items())
        print(
            f"K={k:5d} N={n:6d} M={m:4d}  ours {times['ours']:9.3f} ms  "
            + "  ".join(f"{name} {t:9.3f}" for name, t in times.items() if name != "ours")
            + f"  | speed-up: {ratios}"
        )
    return rows


# --------------------------------------------------------------------------------------------- quantizer


def bench_quantizer(args, device: torch.device) -> dict[str, Any]:
    x = torch.randn(128, 6912, device=device).bfloat16()

    def two_passes():
        absmax = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True)  # pass 1: a reduction
        return torch.mul(x, absmax)  # pass 2: an element-wise pass

    with torch.inference_mode():
        result = {
            "shape": [128, 6912],
            "dtype": "bfloat16",
            "ours_ms": median_ms(lambda: ops.quantize_activation(x), device, args.repeats * 5),
            "two_float_passes_ms": median_ms(two_passes, device, args.repeats * 5),
            "pytorch_reference_ms": median_ms(lambda: bitnet_torch.quantize_activation(x), device, args.repeats),
        }
    result["ratio_two_passes_over_ours"] = result["two_float_passes_ms"] / result["ours_ms"]
    print(
        f"activation quantization [128, 6912] bf16: ours {result['ours_ms']:.3f} ms, two float passes "
        f"{result['two_float_passes_ms']:.3f} ms (x{result['ratio_two_passes_over_ours']:.2f}), "
        f"pure-PyTorch quantizer {result['pytorch_reference_ms']:.3f} ms"
    )
    return result


# --------------------------------------------------------------------------------------------- bandwidth


def measure_bandwidth(args, device: torch.device, nbytes: int = 512 * 2**20) -> dict[str, float]:
    """Read bandwidth (the fastest streaming-read probe of memory_bandwidth.py, every probe recorded) and copy
    bandwidth (bytes read + written), GB/s."""
    from memory_bandwidth import read_bandwidth_gbs

    read, probes = read_bandwidth_gbs(nbytes, args.repeats, device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), device, args.repeats)
    del src, dst
    return {"read_GBps": read, "copy_GBps": 2 * nbytes / copy_ms / 1e6,
            **{f"read_{name}_GBps": value for name, value in probes.items()}}


def bench_bandwidth(args, device: torch.device) -> dict[str, Any]:
    bandwidth = measure_bandwidth(args, device)
    # A GEMV only reads its weights: compare with the better of the read stream and the copy's combined traffic.
    reference = max(bandwidth["read_GBps"], bandwidth["copy_GBps"])
    probes = ", ".join(f"{k[5:-5]} {v:.1f}" for k, v in bandwidth.items() if k.startswith("read_") and k != "read_GBps")
    print(f"memory bandwidth: read {bandwidth['read_GBps']:.1f} GB/s ({probes}), copy {bandwidth['copy_GBps']:.1f} GB/s")
    results: dict[str, Any] = {"bandwidth": bandwidth, "gemv": []}
    with torch.inference_mode():
        n, k = BIG_TERNARY_SHAPE
        packed = torch.randint(0, 255, (n // 4, k), dtype=torch.uint8, device=device) & 0x55  # valid codes 0/1
        scale = torch.ones(1, dtype=torch.bfloat16, device=device)
        x = torch.randn(1, k, device=device).bfloat16()
        t = median_ms(lambda: ops.ternary_linear(x, packed, scale), device, args.repeats)
        results["gemv"].append(_gemv_row("ternary_linear", n, k, packed.numel(), t, reference))
        del packed

        n, k = HEAD_SHAPE
        w_int8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
        w_scale = torch.rand(n, device=device)
        t = median_ms(lambda: ops.int8_linear(x, w_int8, w_scale), device, args.repeats)
        results["gemv"].append(_gemv_row("int8_linear (lm_head)", n, k, w_int8.numel(), t, reference))
        del w_int8
        w_bf16 = torch.randn(n, k, device=device).bfloat16()
        t = median_ms(lambda: F.linear(x, w_bf16), device, args.repeats)
        results["gemv"].append(_gemv_row("bf16 F.linear (lm_head)", n, k, w_bf16.numel() * 2, t, reference))
        del w_bf16
    return results


def _gemv_row(name: str, n: int, k: int, nbytes: int, ms: float, reference_gbps: float) -> dict[str, Any]:
    gbps = nbytes / ms / 1e6
    row = {"name": name, "N": n, "K": k, "weight_bytes": nbytes, "ms": ms, "GBps": gbps,
           "fraction_of_bandwidth": gbps / reference_gbps}
    print(f"decode GEMV {name:26s} [{n} x {k}] {nbytes / 2**20:7.1f} MiB: {ms:8.3f} ms, {gbps:6.1f} GB/s = "
          f"{100 * row['fraction_of_bandwidth']:.0f}% of measured bandwidth")
    return row


# --------------------------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA device is available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = bitnet_torch.backend_info()
    header = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "torch": torch.__version__,
        "backend": info,
    }
    print(f"device {header['device_name']}, threads {header['threads']}, backend {info['backend']} "
          f"(cpu isa {info['cpu_isa']}), torch {torch.__version__}, median of {args.repeats} repeats")
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    ms = [int(v) for v in args.m.split(",") if v]
    results: dict[str, Any] = {"meta": header, "linear": []}
    for k, n in shapes:
        results["linear"].extend(bench_linear(k, n, ms, args, device))
    results["activation_quantization"] = bench_quantizer(args, device)
    if not args.skip_bandwidth:
        results["decode_bandwidth"] = bench_bandwidth(args, device)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
