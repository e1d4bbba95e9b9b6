"""Byte layouts of ternary matrices in GGUF: llama.cpp's ``TQ1_0`` / ``TQ2_0`` and bitnet.cpp's ``I2_S``.

Each packer takes the int8 ternary matrix ``w_t`` ``[N, K]`` (values in {-1, 0, 1}, numpy) and the
per-matrix scale (``mean|W|``, the multiply convention of SPEC §3) and returns the bytes GGUF stores;
each unpacker returns ``(w_t, scale)`` back. Rows are ``K`` contiguous values (GGUF dims ``[K, N]``).
Codes are always ``w + 1`` in {0, 1, 2}.

``TQ2_0`` (llama.cpp ``block_tq2_0``, 66 bytes per 256 values of a row)::

    qs[64]  for half h in {0, 1}, byte j in 0..31: value h*128 + l*32 + j sits in bits 2l..2l+1 (l = 0..3)
    d       fp16 block scale: ``fp16(scale)`` if the block holds a non-zero value, else 0

``TQ1_0`` (llama.cpp ``block_tq1_0``, 54 bytes per 256 values; five trits per byte, base 3)::

    qs[32]  byte j holds values n*32 + j (n = 0..4),        most significant trit first
    qs[16]  byte j holds values 160 + n*16 + j (n = 0..4)
    qh[4]   byte j holds values 240 + n*4 + j (n = 0..3), the fifth trit is 0
    d       fp16 block scale, as for TQ2_0
    a byte stores the base-3 number b as ceil(b * 256 / 243), so that trit n is read as
    ((byte * 3**n) mod 256) * 3 >> 8.

``I2_S`` (bitnet.cpp ``quantize_i2_s``, x86 layout ``QK_I2_S = 128``; one fp32 scale per tensor)::

    the tensor is flattened row-major and cut in blocks of 128 values stored in 32 bytes;
    byte p of a block holds values p, 32+p, 64+p, 96+p at bit shifts 6, 4, 2, 0
    then a 32-byte trailer: the fp32 scale (we repeat it 8 times to fill the 32 bytes)
    total ``N*K/4 + 32`` bytes; the runtime computes ``(code - 1) * scale``.

All three read back bit-exactly; the fp16 block scale of TQ1_0/TQ2_0 is the only lossy part (the exact
scale also travels in our own metadata, see :mod:`bitnet_torch.formats.gguf_layout`).
This module sits below ``models`` (the GGUF reader needs the decoders) and is shared by ``export`` (the packers).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "I2_S_TYPE_ID",
    "I2_S_BLOCK",
    "TQ_BLOCK",
    "TQ1_0_BLOCK_BYTES",
    "TQ2_0_BLOCK_BYTES",
    "i2_s_nbytes",
    "pack_i2_s",
    "unpack_i2_s",
    "pack_tq2_0",
    "unpack_tq2_0",
    "pack_tq1_0",
    "unpack_tq1_0",
    "ternary_from_f16",
]

#: ``GGML_TYPE_I2_S`` in bitnet.cpp's ggml (not in upstream ggml / the ``gguf`` package).
I2_S_TYPE_ID: int = 36
#: Values per I2_S block (x86 build of bitnet.cpp, the layout of Microsoft's published GGUF).
I2_S_BLOCK: int = 128
_I2_S_BLOCK_BYTES = I2_S_BLOCK // 4
_I2_S_TRAILER_BYTES = 32
#: Values per TQ1_0 / TQ2_0 block (``QK_K``).
TQ_BLOCK: int = 256
TQ2_0_BLOCK_BYTES: int = TQ_BLOCK // 4 + 2
TQ1_0_BLOCK_BYTES: int = (TQ_BLOCK - 4 * TQ_BLOCK // 64) // 5 + TQ_BLOCK // 64 + 2

_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.uint16)


def _codes(w_t: np.ndarray) -> np.ndarray:
    """Validate a ternary matrix and return its codes ``w + 1`` as uint8."""
    if w_t.ndim != 2:
        raise ValueError(f"expected a 2-D ternary matrix [N, K], got shape {w_t.shape}")
    if not np.issubdtype(w_t.dtype, np.integer):
        raise TypeError(f"expected an integer ternary matrix, got dtype {w_t.dtype}")
    if w_t.size and (w_t.min() < -1 or w_t.max() > 1):
        raise ValueError(f"ternary matrix holds values outside {{-1, 0, 1}}: range [{w_t.min()}, {w_t.max()}]")
    return (w_t.astype(np.int16) + 1).astype(np.uint8)


def _check_row_blocks(k: int, block: int, type_name: str) -> None:
    if k % block != 0:
        raise ValueError(
            f"{type_name} stores rows in blocks of {block} values, but the row length (in_features) is {k}"
        )


def _block_scales(codes: np.ndarray, scale: float) -> np.ndarray:
    """fp16 block scale per block ``[..., n_blocks]``: ``fp16(scale)`` where a block is non-zero, else 0 (llama.cpp)."""
    nonzero = (codes != 1).any(axis=-1)
    return np.where(nonzero, np.float32(scale), np.float32(0)).astype(np.float16)


def _scale_from_blocks(d: np.ndarray, type_name: str) -> float:
    """The one per-matrix scale behind fp16 block scales (0 for all-zero blocks); raises if they disagree."""
    values = np.unique(d[d != 0].astype(np.float32))
    if values.size > 1:
        raise ValueError(
            f"{type_name} tensor has {values.size} different block scales: it is not a BitNet per-matrix ternary "
            "weight (it was quantized from a float matrix), and cannot be imported losslessly"
        )
    return float(values[0]) if values.size else 0.0


def i2_s_nbytes(n: int, k: int) -> int:
    """Bytes bitnet.cpp stores for an ``[N, K]`` I2_S tensor: 2 bits per value plus the 32-byte scale trailer."""
    return n * k // 4 + _I2_S_TRAILER_BYTES


def pack_i2_s(w_t: np.ndarray, scale: float) -> np.ndarray:
    """Pack ``w_t`` ``[N, K]`` in bitnet.cpp's I2_S layout; returns uint8 ``[N*K/4 + 32]``.

    Refuses ``K`` not divisible by 128 (bitnet.cpp's kernels walk each row in whole 128-value blocks).
    """
    codes = _codes(w_t)
    n, k = codes.shape
    _check_row_blocks(k, I2_S_BLOCK, "I2_S")
    groups = codes.reshape(-1, 4, _I2_S_BLOCK_BYTES)
    packed = (groups[:, 0] << 6) | (groups[:, 1] << 4) | (groups[:, 2] << 2) | groups[:, 3]
    trailer = np.full(_I2_S_TRAILER_BYTES // 4, scale, dtype=np.float32).view(np.uint8)
    return np.concatenate([packed.reshape(-1), trailer])


def unpack_i2_s(data: np.ndarray, n: int, k: int) -> tuple[np.ndarray, float]:
    """Unpack I2_S bytes of an ``[N, K]`` tensor into ``(w_t int8 [N, K], fp32 scale)``.

    Raises ``ValueError`` for a wrong byte count, ``K`` not divisible by 128, or the unused code 3.
    """
    data = np.asarray(data).reshape(-1).view(np.uint8)
    if data.size != i2_s_nbytes(n, k):
        raise ValueError(f"I2_S tensor [{n}, {k}] needs {i2_s_nbytes(n, k)} bytes, got {data.size}")
    _check_row_blocks(k, I2_S_BLOCK, "I2_S")
    body = data[: n * k // 4].reshape(-1, _I2_S_BLOCK_BYTES)
    groups = np.stack([(body >> shift) & 3 for shift in (6, 4, 2, 0)], axis=1)
    if (groups == 3).any():
        raise ValueError("I2_S tensor holds the code 3, which bitnet.cpp never writes: the data is corrupt")
    w_t = groups.reshape(n, k).astype(np.int8) - 1
    scale = float(data[n * k // 4 : n * k // 4 + 4].view(np.float32)[0])
    return w_t, scale


def pack_tq2_0(w_t: np.ndarray, scale: float) -> np.ndarray:
    """Pack ``w_t`` ``[N, K]`` as llama.cpp TQ2_0 blocks; returns uint8 ``[N, K/256 * 66]``. Refuses K % 256 != 0."""
    codes = _codes(w_t)
    n, k = codes.shape
    _check_row_blocks(k, TQ_BLOCK, "TQ2_0")
    blocks = codes.reshape(n, k // TQ_BLOCK, TQ_BLOCK)
    quarters = blocks.reshape(n, -1, 2, 4, 32)
    qs = quarters[:, :, :, 0] | (quarters[:, :, :, 1] << 2) | (quarters[:, :, :, 2] << 4) | (quarters[:, :, :, 3] << 6)
    d = _block_scales(blocks, scale)[..., None].view(np.uint8)
    return np.concatenate([qs.reshape(n, -1, 64), d], axis=-1).reshape(n, -1)


def unpack_tq2_0(data: np.ndarray, n: int, k: int) -> tuple[np.ndarray, float]:
    """Unpack TQ2_0 bytes ``[N, K/256*66]`` into ``(w_t int8 [N, K], scale)``; raises on code 3 or mixed scales."""
    _check_row_blocks(k, TQ_BLOCK, "TQ2_0")
    blocks = np.asarray(data).view(np.uint8).reshape(n, k // TQ_BLOCK, TQ2_0_BLOCK_BYTES)
    qs = blocks[..., :64].reshape(n, -1, 2, 1, 32)
    codes = (qs >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)) & 3
    if (codes == 3).any():
        raise ValueError("TQ2_0 tensor holds the code 3, which a ternary weight never has: the data is corrupt")
    w_t = codes.reshape(n, k).astype(np.int8) - 1
    d = np.ascontiguousarray(blocks[..., 64:66]).view(np.float16)
    return w_t, _scale_from_blocks(d, "TQ2_0")


def _base3_bytes(codes: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Combine trits (axis -2) into base-3 numbers and store them as the fixed-point byte ceil(b*256/243)."""
    value = (codes.astype(np.uint16) * weights.reshape(-1, 1)).sum(axis=-2, dtype=np.uint16)
    return ((value * 256 + 242) // 243).astype(np.uint8)


def _trits_from_bytes(q: np.ndarray, count: int) -> np.ndarray:
    """Read ``count`` trits (most significant first) from fixed-point base-3 bytes; trit axis is -2."""
    mult = np.array([1, 3, 9, 27, 81][:count], dtype=np.uint16).reshape(-1, 1)
    shifted = (q[..., None, :].astype(np.uint16) * mult) & 0xFF
    return ((shifted * 3) >> 8).astype(np.uint8)


def pack_tq1_0(w_t: np.ndarray, scale: float) -> np.ndarray:
    """Pack ``w_t`` ``[N, K]`` as llama.cpp TQ1_0 blocks; returns uint8 ``[N, K/256 * 54]``. Refuses K % 256 != 0."""
    codes = _codes(w_t)
    n, k = codes.shape
    _check_row_blocks(k, TQ_BLOCK, "TQ1_0")
    blocks = codes.reshape(n, k // TQ_BLOCK, TQ_BLOCK)
    qs0 = _base3_bytes(blocks[..., :160].reshape(n, -1, 5, 32), _POW3)
    qs1 = _base3_bytes(blocks[..., 160:240].reshape(n, -1, 5, 16), _POW3)
    qh = _base3_bytes(blocks[..., 240:].reshape(n, -1, 4, 4), _POW3[:4])
    d = _block_scales(blocks, scale)[..., None].view(np.uint8)
    return np.concatenate([qs0, qs1, qh, d], axis=-1).reshape(n, -1)


def unpack_tq1_0(data: np.ndarray, n: int, k: int) -> tuple[np.ndarray, float]:
    """Unpack TQ1_0 bytes ``[N, K/256*54]`` into ``(w_t int8 [N, K], scale)``; raises on mixed block scales."""
    _check_row_blocks(k, TQ_BLOCK, "TQ1_0")
    blocks = np.asarray(data).view(np.uint8).reshape(n, k // TQ_BLOCK, TQ1_0_BLOCK_BYTES)
    parts = [
        _trits_from_bytes(blocks[..., 0:32], 5).reshape(n, -1, 160),
        _trits_from_bytes(blocks[..., 32:48], 5).reshape(n, -1, 80),
        _trits_from_bytes(blocks[..., 48:52], 4).reshape(n, -1, 16),
    ]
    w_t = np.concatenate(parts, axis=-1).reshape(n, k).astype(np.int8) - 1
    d = np.ascontiguousarray(blocks[..., 52:54]).view(np.float16)
    return w_t, _scale_from_blocks(d, "TQ1_0")


def ternary_from_f16(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Recover ``(w_t, scale)`` from a dequantized ternary matrix ``w_t * scale`` stored as float.

    Raises ``ValueError`` when the non-zero magnitudes differ (the tensor is not one-scale ternary).
    """
    values = np.asarray(values, dtype=np.float32)
    magnitudes = np.unique(np.abs(values[values != 0]))
    if magnitudes.size > 1:
        raise ValueError(
            f"float tensor has {magnitudes.size} different non-zero magnitudes: it is not a ternary weight "
            "times one scale, so its ternary values cannot be recovered"
        )
    return np.sign(values).astype(np.int8), float(magnitudes[0]) if magnitudes.size else 0.0
