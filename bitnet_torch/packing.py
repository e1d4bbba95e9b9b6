"""2-bit packing of ternary matrices in the checkpoint layout (SPEC.md §3).

A ternary matrix ``W_t`` of shape ``[N, K]`` is stored as uint8 ``[N/4, K]``; with ``P = N/4``::

    packed[p, k] = sum_{i=0..3} (W_t[i*P + p, k] + 1) << (2*i)

so one packed byte holds the same input column ``k`` of the four output rows ``p, P+p, 2P+p, 3P+p``,
slot 0 in the lowest two bits. Codes are ``w + 1`` in {0, 1, 2}; 3 never occurs. This is bit-identical
to what Transformers' ``pack_weights`` writes for N divisible by 4, and what bitnet.cpp's converter reads.
"""

from __future__ import annotations

import torch

__all__ = ["VALUES_PER_BYTE", "pack_ternary", "unpack_ternary", "packed_shape"]

#: Ternary values stored in one uint8 (2 bits each), SPEC §3.
VALUES_PER_BYTE: int = 4


def packed_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """Return the uint8 shape ``(N/4, K)`` that holds an ``[N, K]`` ternary matrix; N must divide by 4."""
    if out_features % VALUES_PER_BYTE != 0:
        raise ValueError(
            f"out_features={out_features} is not a multiple of {VALUES_PER_BYTE}: the packed checkpoint layout "
            "(SPEC §3) stores 4 output rows per byte; pad the layer to a multiple of 4 rows"
        )
    return out_features // VALUES_PER_BYTE, in_features


def pack_ternary(w_t: torch.Tensor) -> torch.Tensor:
    """Pack a ternary matrix ``[N, K]`` (integer dtype, values in {-1, 0, 1}) into uint8 ``[N/4, K]``.

    Never mutates its input. Raises ``TypeError`` for a floating/bool dtype and ``ValueError`` for a
    tensor that is not 2-D, has N not divisible by 4, or holds values outside {-1, 0, 1}.
    """
    if not isinstance(w_t, torch.Tensor):
        raise TypeError(f"pack_ternary expects a torch.Tensor, got {type(w_t).__name__}")
    if w_t.dtype.is_floating_point or w_t.dtype.is_complex or w_t.dtype == torch.bool:
        raise TypeError(
            f"pack_ternary expects an integer tensor of ternary values (e.g. int8), got dtype {w_t.dtype}; "
            "quantize float weights first with bitnet_torch.quantize_weight"
        )
    if w_t.dim() != 2:
        raise ValueError(f"pack_ternary expects a 2-D [out_features, in_features] tensor, got shape {tuple(w_t.shape)}")
    n, k = w_t.shape
    p, _ = packed_shape(n, k)
    if w_t.numel() and (int(w_t.min()) < -1 or int(w_t.max()) > 1):
        raise ValueError(
            f"pack_ternary expects values in {{-1, 0, 1}}, found range [{int(w_t.min())}, {int(w_t.max())}]"
        )
    codes = (w_t.to(torch.int16) + 1).to(torch.uint8).view(VALUES_PER_BYTE, p, k)
    packed = codes[0].clone()
    for i in range(1, VALUES_PER_BYTE):
        packed |= codes[i] << (2 * i)
    return packed


def unpack_ternary(packed: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """Unpack uint8 ``[N/4, K]`` (SPEC §3 layout) into the int8 ternary matrix ``[N, K]``.

    Raises ``TypeError`` for a dtype other than uint8, ``ValueError`` for a tensor that is not 2-D or (with
    ``validate``, which costs a host synchronisation) that holds the unused code 3 (a corrupt checkpoint).
    """
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"unpack_ternary expects a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_ternary expects a uint8 packed tensor, got dtype {packed.dtype}")
    if packed.dim() != 2:
        raise ValueError(f"unpack_ternary expects a 2-D [out_features/4, in_features] tensor, got shape {tuple(packed.shape)}")
    slots = [(packed >> (2 * i)) & 3 for i in range(VALUES_PER_BYTE)]
    codes = torch.cat(slots, dim=0)
    if validate and codes.numel() and bool((codes == 3).any()):
        raise ValueError("packed ternary tensor holds the code 3, which SPEC §3 never writes: the data is corrupt")
    return codes.to(torch.int8) - 1
