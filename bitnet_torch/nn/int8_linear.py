"""int8-per-output-channel weights: :class:`Int8Linear` (e.g. the ``lm_head``) and :class:`Int8Embedding`.

A float matrix ``W [N, K]`` is held as int8 codes ``[N, K]`` plus one fp32 scale per row ``[N]``: each row
is quantized exactly like an activation token (absmax/127, round-half-to-even; SPEC §1 via
:func:`bitnet_torch.quantize_activation`), so ``W[n] ≈ weight[n] * weight_scale[n]``. The matmul runs
through ``torch.ops.bitnet.int8_linear`` (int8 activations per token × int8 weight, exact int32
accumulation, fp32 epilogue), which reads a quarter of the bytes of an fp32 head and half of a bf16 one.

:class:`Int8Embedding` looks rows up and dequantizes them; it can share the int8 tensor of an
:class:`Int8Linear` (tied input/output embeddings), so the two cost one int8 matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..quant import quantize_activation

__all__ = ["Int8Linear", "Int8Embedding", "quantize_rows"]


#: Rows quantized at a time, so that the fp32 temporaries of a 128k-row head stay small (~40 MB for K = 2560).
_ROWS_PER_CHUNK = 4096


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of a float ``[N, K]`` matrix to int8: returns (int8 ``[N, K]``, fp32 scales ``[N]``).

    Works in chunks of rows, so the extra memory is a few fp32 chunks, not copies of the whole matrix.
    Refuses (``ValueError``) anything that is not a 2-D float tensor.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_rows expects a 2-D [out_features, in_features] weight, got shape {tuple(weight.shape)}")
    weight = weight.detach()
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], _ROWS_PER_CHUNK):
        rows = slice(start, start + _ROWS_PER_CHUNK)
        chunk_codes, chunk_scales = quantize_activation(weight[rows])
        codes[rows] = chunk_codes
        scales[rows] = chunk_scales.reshape(-1)
    return codes, scales


class Int8Linear(nn.Module):
    """Inference linear layer with int8 weights and one fp32 scale per output row (no bias).

    Buffers: ``weight`` int8 ``[out_features, in_features]``, ``weight_scale`` fp32 ``[out_features]``.
    Output dtype follows the input. Build with :meth:`from_float` (or :meth:`from_linear`).
    """

    def __init__(self, in_features: int, out_features: int, device=None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "Int8Linear":
        """Quantize a float ``[N, K]`` weight row by row (the float tensor is not kept)."""
        codes, scale = quantize_rows(weight)
        layer = cls(weight.shape[1], weight.shape[0], device="meta")
        layer.weight = codes
        layer.weight_scale = scale
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """Quantize an ``nn.Linear`` without bias (an output head)."""
        if linear.bias is not None:
            raise ValueError("Int8Linear holds no bias; quantize a bias-free linear layer (an lm_head)")
        return cls.from_float(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear expected input with last dimension {self.in_features}, got shape {tuple(x.shape)}")
        return ops.int8_linear(x, self.weight, self.weight_scale)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``weight * weight_scale[:, None]`` as a float matrix (what a checkpoint stores)."""
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


class Int8Embedding(nn.Module):
    """Embedding lookup from int8 rows × fp32 per-row scale; the output is in ``dtype`` (the model dtype).

    ``weight``/``weight_scale`` have the layout of :class:`Int8Linear` and may be the very same tensors
    (tied embeddings): pass ``shared=`` an :class:`Int8Linear`.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype, padding_idx: int | None = None,
                 device=None) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.dtype = dtype
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, dtype=torch.float32, device=device))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, shared: Int8Linear | None = None) -> "Int8Embedding":
        """Quantize an ``nn.Embedding``, or reuse the int8 tensors of ``shared`` (which must hold the same matrix)."""
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.weight.dtype,
                    embedding.padding_idx, device="meta")
        if shared is not None:
            if (shared.out_features, shared.in_features) != (embedding.num_embeddings, embedding.embedding_dim):
                raise ValueError("the shared Int8Linear does not have the embedding's shape")
            layer.weight, layer.weight_scale = shared.weight, shared.weight_scale
        else:
            layer.weight, layer.weight_scale = quantize_rows(embedding.weight)
        return layer

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input_ids, self.weight)
        scales = F.embedding(input_ids, self.weight_scale[:, None])
        return (rows.float() * scales).to(self.dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float embedding matrix these codes stand for."""
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype or self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row scales, dtype={self.dtype}"
