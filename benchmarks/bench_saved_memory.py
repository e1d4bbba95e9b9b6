"""Saved-activation memory of BitLinear vs nn.Linear (what autograd keeps between forward and backward).

Usage: python benchmarks/bench_saved_memory.py [--shape 8 512 2560] [--out-features 2560] [--dtype float32]

Counts the bytes of every tensor autograd saves for backward, excluding the parameters themselves
(which exist whether or not a backward follows).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from bitnet_torch import BitLinear


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the non-parameter tensors saved for backward by one forward of ``module``."""
    param_ptrs = {p.data_ptr() for p in module.parameters()}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.data_ptr() not in param_ptrs:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs="+", default=[8, 512, 2560], help="input shape, last dim = in_features")
    parser.add_argument("--out-features", type=int, default=2560)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    x = torch.randn(*args.shape, dtype=dtype, requires_grad=True)
    k = args.shape[-1]
    rows = []
    for name, module in [
        ("nn.Linear", nn.Linear(k, args.out_features, bias=False, dtype=dtype)),
        ("BitLinear", BitLinear(k, args.out_features, bias=False, dtype=dtype)),
    ]:
        rows.append((name, saved_bytes(module, x)))
    base = rows[0][1]
    print(f"input {tuple(args.shape)} {args.dtype}, out_features {args.out_features}, torch {torch.__version__}")
    print(f"{'layer':<10} {'saved for backward':>20} {'vs nn.Linear':>14}")
    for name, b in rows:
        print(f"{name:<10} {b / 2**20:>17.2f} MiB {b / base:>13.3f}x")


if __name__ == "__main__":
    main()
