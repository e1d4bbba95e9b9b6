"""An independent reference of SPEC.md §1 and §3, written from the text of the spec (not from the package).

The tests compare the package against these slow, literal implementations; nothing here imports
bitnet_torch.
"""

from __future__ import annotations

import torch


def ref_quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC §1: s_w = 1 / max(mean|W|, 1e-5); W_t = clamp(round(W * s_w), -1, 1). Returns (W_t, 1/s_w)."""
    wf = w.float()
    mean_abs = torch.clamp(wf.abs().mean(), min=1e-5)
    w_t = torch.clamp(torch.round(wf / mean_abs), -1, 1)
    return w_t.to(torch.int8), mean_abs


def ref_quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC §1: s_x = 127 / max(max|x|, 1e-5) per token; x_q = clamp(round(x * s_x), -128, 127). Returns (x_q, 1/s_x)."""
    xf = x.float()
    absmax = torch.clamp(xf.abs().amax(dim=-1, keepdim=True), min=1e-5)
    x_q = torch.clamp(torch.round(xf * (127 / absmax)), -128, 127)
    return x_q.to(torch.int8), absmax / 127


def ref_pack(w_t: torch.Tensor) -> torch.Tensor:
    """SPEC §3, literally: packed[p, k] = sum_i (W_t[i*P + p, k] + 1) << 2i."""
    n, k = w_t.shape
    p_rows = n // 4
    out = torch.zeros(p_rows, k, dtype=torch.int64)
    codes = w_t.to(torch.int64) + 1
    for i in range(4):
        out += codes[i * p_rows : (i + 1) * p_rows] << (2 * i)
    return out.to(torch.uint8)


def ref_unpack(packed: torch.Tensor) -> torch.Tensor:
    """SPEC §3: W_t[i*P + p, k] = ((packed[p, k] >> 2i) & 3) - 1."""
    p_rows, k = packed.shape
    out = torch.empty(4 * p_rows, k, dtype=torch.int64)
    as_int = packed.to(torch.int64)
    for i in range(4):
        out[i * p_rows : (i + 1) * p_rows] = ((as_int >> (2 * i)) & 3) - 1
    return out.to(torch.int8)


def ref_bitlinear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """SPEC §1 output y = (x_q @ W_t^T) / (s_x * s_w) (+ bias), computed in float64 from the integer product."""
    x_q, x_scale = ref_quantize_activation(x)
    w_t, w_scale = ref_quantize_weight(w)
    acc = x_q.double().reshape(-1, x.shape[-1]) @ w_t.double().t()
    y = acc * (x_scale.double().reshape(-1, 1) * w_scale.double())
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], w.shape[0])
