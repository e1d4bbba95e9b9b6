"""Autograd formulas of the inference ops, so gradients flow *through* a frozen packed/int8 layer.

LoRA on a packed base needs ``dL/dx`` of every packed projection (the adapters of earlier layers learn
through it), although the packed weight itself is frozen. The formulas are the straight-through
estimator of SPEC §2: activation quantization passes the gradient unchanged, so

* ``ternary_linear``: ``dx = dy @ (W_t * mean|W|)``, ``dbias = Σ dy``;
* ``ternary_linear_group``: ``dx = Σ_i dy_i @ (W_t,i * mean|W_i|)``, ``dbias_i = Σ dy_i``;
* ``int8_linear``:    ``dx = dy @ (W_q * scale[:, None])``, ``dbias = Σ dy``.

The packed weight, its scales and the int8 weight get no gradient (they are integer or frozen state).
The dequantized weight exists only inside backward, one layer at a time.
"""

from __future__ import annotations

from typing import Any

import torch

from .packing import unpack_ternary

__all__ = ["records_autograd", "refuse_untracked_bias_gradients", "register_autograd_formulas"]


def records_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records a call on these tensors (grad mode on and one of them requires a gradient)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, weight_scale, bias = inputs
    ctx.save_for_backward(weight, weight_scale)
    ctx.x_shape = x.shape
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _input_and_bias_grads(ctx: Any, grad: torch.Tensor, dequantized: torch.Tensor):
    n = dequantized.shape[0]
    g = grad.reshape(-1, n).float()
    grad_x = (g @ dequantized).to(ctx.x_dtype).reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None
    grad_bias = g.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[3] else None
    return grad_x, None, None, grad_bias


def _dequantized_ternary(packed: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``W_t * mean|W|`` in fp32 from the packed codes and the one-element (multiply-convention) scale."""
    return unpack_ternary(packed, validate=False).float() * weight_scale.float().reshape(())


def _ternary_linear_backward(ctx: Any, grad: torch.Tensor):
    packed, weight_scale = ctx.saved_tensors
    return _input_and_bias_grads(ctx, grad, _dequantized_ternary(packed, weight_scale))


def _int8_linear_backward(ctx: Any, grad: torch.Tensor):
    weight, weight_scale = ctx.saved_tensors
    dequantized = weight.float() * weight_scale.float().reshape(-1, 1)
    return _input_and_bias_grads(ctx, grad, dequantized)


def refuse_untracked_bias_gradients(bias: list[torch.Tensor | None]) -> None:
    """Raise when a ``ternary_linear_group`` bias list mixes None with a tensor that requires grad.

    torch.library treats a bias list holding a None as one opaque argument: it cannot carry gradients.
    """
    if None in bias and any(b is not None and b.requires_grad for b in bias):
        raise NotImplementedError(
            "ternary_linear_group: a bias that requires grad needs every member to have a bias (a list mixing "
            "None and tensors gets no gradient); call ternary_linear per member instead"
        )


def _group_setup_context(ctx: Any, inputs: tuple, output: list[torch.Tensor]) -> None:
    x, packed, weight_scale, bias = inputs
    refuse_untracked_bias_gradients(bias)
    ctx.bias_is_tensor_list = None not in bias
    ctx.save_for_backward(*packed, *weight_scale)
    ctx.members = len(packed)
    ctx.x_shape = x.shape
    ctx.x_dtype = x.dtype
    ctx.bias_dtypes = [None if b is None else b.dtype for b in bias]


def _ternary_linear_group_backward(ctx: Any, grads: list[torch.Tensor | None]):
    saved = ctx.saved_tensors
    packed, weight_scale = saved[: ctx.members], saved[ctx.members :]
    grad_x = None
    bias_grads: list[torch.Tensor | None] = [None] * ctx.members
    for i, grad in enumerate(grads):
        if grad is None:
            continue
        g = grad.reshape(-1, packed[i].shape[0] * 4).float()
        if ctx.needs_input_grad[0]:
            term = g @ _dequantized_ternary(packed[i], weight_scale[i])
            grad_x = term if grad_x is None else grad_x + term
        if ctx.bias_dtypes[i] is not None:
            bias_grads[i] = g.sum(0).to(ctx.bias_dtypes[i])
    if grad_x is not None:
        grad_x = grad_x.to(ctx.x_dtype).reshape(ctx.x_shape)
    none = [None] * ctx.members
    return grad_x, none, none, (bias_grads if ctx.bias_is_tensor_list else None)


def register_autograd_formulas() -> None:
    """Attach the straight-through backward formulas to ``bitnet::ternary_linear`` and ``bitnet::int8_linear``."""
    torch.library.register_autograd("bitnet::ternary_linear", _ternary_linear_backward, setup_context=_setup_context)
    torch.library.register_autograd(
        "bitnet::ternary_linear_group", _ternary_linear_group_backward, setup_context=_group_setup_context
    )
    torch.library.register_autograd("bitnet::int8_linear", _int8_linear_backward, setup_context=_setup_context)
