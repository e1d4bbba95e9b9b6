"""The executable spec of BitNet b1.58 quantization (SPEC.md §1-§2).

Pure PyTorch, no custom ops: every kernel in ``csrc/`` is tested against these functions.

* :func:`quantize_weight` -- absmean ternary weights, one scale per matrix.
* :func:`quantize_activation` -- absmax int8 activations, one scale per token (row of the last dim).
* :func:`fake_quantize_weight` / :func:`fake_quantize_activation` -- the dequantized values, with the
  straight-through estimator (identity gradient) and the lambda warm-up blend of SPEC §2.
* :func:`lambda_schedule` -- ``min(step / warmup_steps, 1)``.

Scales are always computed in fp32, whatever the input dtype (SPEC §1).
"""

from __future__ import annotations

import torch

__all__ = [
    "SCALE_EPS",
    "ACT_QMAX",
    "ACT_QMIN",
    "activation_qrange",
    "quantize_weight",
    "quantize_activation",
    "dequantize_activation",
    "fake_quantize_weight",
    "fake_quantize_activation",
    "lambda_schedule",
]

#: Lower bound of every scale denominator (SPEC §1): ``max(mean|W|, 1e-5)``, ``max(absmax, 1e-5)``.
SCALE_EPS: float = 1e-5
#: int8 activation range (SPEC §1): codes are clamped to ``[-128, 127]``, the scale maps absmax to 127.
ACT_QMAX: int = 127
ACT_QMIN: int = -128

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def activation_qrange(bits: int) -> tuple[int, int]:
    """Return ``(qmin, qmax)`` of a signed ``bits``-bit activation code (8 → (-128, 127))."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"activation bits must be an int in [2, 8], got {bits!r}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _check_float(t: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what} must be a floating-point tensor (fp32/bf16/fp16), got dtype {t.dtype}")


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """Return the absmean weight scale ``max(mean|w|, 1e-5)`` as a 0-dim fp32 tensor (SPEC §1)."""
    _check_float(w, "weight")
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty weight (mean |W| is undefined)")
    return w.detach().float().abs().mean().clamp(min=SCALE_EPS)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float weight to ternary values with one absmean scale per matrix (SPEC §1).

    Returns ``(w_t, scale)``: ``w_t`` int8 in {-1, 0, 1} with the shape of ``w``, and ``scale`` a 0-dim
    fp32 tensor equal to ``max(mean|w|, 1e-5)``, so that ``w ≈ w_t * scale``. ``round`` is
    round-half-to-even. Raises ``TypeError`` for a non-float tensor, ``ValueError`` for an empty one.
    """
    scale = weight_scale(w)
    w_t = torch.clamp(torch.round(w.detach().float() / scale), -1, 1).to(torch.int8)
    return w_t, scale


def quantize_activation(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations per token (per row of the last dimension) with an absmax scale (SPEC §1).

    Returns ``(x_q, scale)``: ``x_q`` int8 with the shape of ``x``, equal to
    ``clamp(round(x.float() * (qmax / max(absmax, 1e-5))), qmin, qmax)``; ``scale`` fp32 of shape
    ``x.shape[:-1] + (1,)`` equal to ``max(absmax, 1e-5) / qmax``, so that ``x ≈ x_q * scale``.
    All-zero tokens give zero codes and the scale ``1e-5 / qmax`` (never NaN).
    Raises ``TypeError`` for a non-float input and ``ValueError`` for a 0-dim one.
    """
    _check_float(x, "activation")
    if x.dim() == 0:
        raise ValueError("activation must have at least one dimension (the feature dimension)")
    qmin, qmax = activation_qrange(bits)
    xf = x.detach().float()
    if x.shape[-1] == 0:
        absmax = torch.zeros(x.shape[:-1] + (1,), dtype=torch.float32, device=x.device)
    else:
        absmax = xf.abs().amax(dim=-1, keepdim=True)
    absmax = absmax.clamp(min=SCALE_EPS)
    # ``qmax / absmax`` is ``absmax.reciprocal() * qmax`` in PyTorch on every device; kernels match that.
    x_q = torch.clamp(torch.round(xf * (qmax / absmax)), qmin, qmax).to(torch.int8)
    # A true division on every device (CUDA rewrites ``tensor / scalar`` as a multiply by the reciprocal).
    return x_q, torch.div(absmax, torch.full_like(absmax, qmax))


def dequantize_activation(x_q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Return ``x_q * scale`` in ``dtype`` (the value the quantized activation stands for)."""
    return (x_q.float() * scale).to(dtype)


def _blend(x: torch.Tensor, q: torch.Tensor, lambda_: float) -> torch.Tensor:
    """Straight-through blend ``x + λ (q - x).detach()`` (SPEC §2); λ = 1 is plain STE."""
    if not 0.0 <= float(lambda_) <= 1.0:
        raise ValueError(f"lambda_ must be in [0, 1], got {lambda_!r}")
    if lambda_ == 0.0:
        return x
    return x + (lambda_ * (q - x)).detach()


def fake_quantize_weight(w: torch.Tensor, lambda_: float = 1.0) -> torch.Tensor:
    """Return the dequantized ternary weight ``w_t * scale`` with an identity (STE) gradient.

    With ``lambda_ < 1`` the result is ``w + λ (Q(w) - w)`` (gradual quantization, SPEC §2).
    The result has ``w``'s dtype.
    """
    w_t, scale = quantize_weight(w)
    return _blend(w, (w_t.float() * scale).to(w.dtype), lambda_)


def fake_quantize_activation(x: torch.Tensor, lambda_: float = 1.0, bits: int = 8) -> torch.Tensor:
    """Return the dequantized per-token int8 activation with an identity (STE) gradient.

    With ``lambda_ < 1`` the result is ``x + λ (Q(x) - x)`` (SPEC §2). The result has ``x``'s dtype.
    """
    x_q, scale = quantize_activation(x, bits)
    return _blend(x, dequantize_activation(x_q, scale, x.dtype), lambda_)


def lambda_schedule(step: int, warmup_steps: int) -> float:
    """Return the gradual-quantization strength ``min(step / warmup_steps, 1)`` (SPEC §2).

    ``warmup_steps <= 0`` means no warm-up (always 1.0).
    """
    if warmup_steps <= 0:
        return 1.0
    return float(min(max(step, 0) / warmup_steps, 1.0))
