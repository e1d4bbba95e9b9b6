"""ggml's ``Q6_K`` k-quant, the writing half: float matrices (the token embedding / tied head) to GGUF bytes.

``Q6_K`` (ggml ``block_q6_K``, type 14, 210 bytes per 256 values of a row; 6.5625 bits per value)::

    ql[128]     low 4 bits of the codes: for half h in {0, 1}, byte h*64 + k*32 + l (k in {0, 1}, l in 0..31)
                holds code h*128 + k*32 + l in bits 0..3 and code h*128 + (k+2)*32 + l in bits 4..7
    qh[64]      high 2 bits: byte h*32 + l holds code h*128 + q*32 + l in bits 2q..2q+1 (q = 0..3)
    scales[16]  int8, one per 16 consecutive values
    d           fp16 super-block scale
    value i = d * scales[i // 16] * (code_i - 32), codes in 0..63

:func:`quantize_q6_k` follows ggml's reference quantizer (``quantize_row_q6_K_ref`` with ``make_qx_quants(16,
32, x, L, rmse_type=1, NULL)``, the one ``llama-quantize`` uses without an importance matrix): for each
16-value sub-block, the scale that minimises the ``x**2``-weighted squared error over 19 trial scales
``-(32 + 0.1*t) / max`` (``t`` = -9..9, ``max`` the value of largest magnitude); the 16 sub-block scales are then
quantized to int8 against ``d = max_scale / -128`` (fp16), and every value to the nearest code of its sub-block
scale ``d * scales[j]``, clamped to [-32, 31].

It is lossy: a value is off by up to half a step of the largest sub-block scale, ``max|x| / 62`` of its
256-value block (measured up to ``max|x| / 56`` where the int8 rounding of a sub-block scale makes a value clamp),
much less in sub-blocks of small values; the relative RMS error is about 2%. Where ``d`` is an fp16 subnormal
(blocks whose largest magnitude is below about 0.25) its rounding adds up to ``32 * 128 * 2**-25`` (1.2e-4).
The arithmetic is float32 in ggml's order: the bytes equal upstream llama.cpp's ``llama-quantize``; a build that
fuses multiply-adds (bitnet.cpp's) can break a near-tie between two trial scales the other way (measured: one
sub-block scale in 5 of 308 blocks). Any of these decodes with ggml's dequantizer (``gguf.quants``, the runtimes).

Vectorised numpy over chunks of rows: the 2B-4T embedding (128256 x 2560) takes about 13 s on one core.
This module sits below ``models`` beside :mod:`.ternary`; ``export`` uses it, reading goes through
``gguf.quants.dequantize``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

__all__ = ["Q6_K_BLOCK", "Q6_K_BLOCK_BYTES", "Q6_K_TYPE_ID", "q6_k_nbytes", "quantize_q6_k"]

#: ``GGML_TYPE_Q6_K``.
Q6_K_TYPE_ID: int = 14
#: Values per super-block (``QK_K``) and per sub-block (one int8 scale each).
Q6_K_BLOCK: int = 256
_SUB = 16
#: ``ql[128] + qh[64] + scales[16] + d (fp16)``.
Q6_K_BLOCK_BYTES: int = Q6_K_BLOCK // 2 + Q6_K_BLOCK // 4 + Q6_K_BLOCK // _SUB + 2
#: ``nmax`` of ``make_qx_quants`` for Q6_K: codes -32..31 around the zero point 32.
_NMAX = 32
#: ggml's ``GROUP_MAX_EPS``: a (sub-)block whose largest magnitude is below it is stored as zeros.
_GROUP_MAX_EPS = np.float32(1e-15)
#: The largest magnitude whose block scale ``d`` (about ``max|x| / (31.1 * 128)``) fits in fp16; beyond it ggml's
#: float32 sums (``x**3``) overflow too.
_MAX_MAGNITUDE = float(np.finfo(np.float16).max) * 128 * 31
#: Values per quantized chunk (bounds the temporaries; about 1 MiB per float32 array).
_CHUNK_VALUES = 1 << 18


def q6_k_nbytes(n_rows: int, n_cols: int) -> int:
    """Bytes of an ``[n_rows, n_cols]`` matrix in Q6_K (``n_cols`` a multiple of 256)."""
    return n_rows * (n_cols // Q6_K_BLOCK) * Q6_K_BLOCK_BYTES


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: round half to even (float32 magic-number rounding), as float32."""
    return np.rint(v)


def _make_qx_quants(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``make_qx_quants(16, 32, x, L, 1, NULL)`` on sub-blocks ``x`` laid out ``[16, n_sub]`` (float32).

    Returns ``(scale [n_sub], L [16, n_sub])``: the chosen sub-block scale and codes ``l + 32`` (uint8) of the
    best trial (kept for sub-blocks whose final scale rounds to zero, as ggml leaves them).
    """
    n_sub = x.shape[1]
    idx = np.abs(x).argmax(axis=0)  # the first largest magnitude, as ggml's strict '>'
    vmax = x[idx, np.arange(n_sub)]
    live = np.abs(vmax) >= _GROUP_MAX_EPS
    vmax = np.where(live, vmax, np.float32(1))  # dead sub-blocks: any finite divisor, their result is zeroed
    w = x * x
    wx = w * x

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        l = np.clip(_nearest_int(iscale * x), -_NMAX, _NMAX - 1)
        sumlx = (wx * l).sum(axis=0)  # axis 0 of a C-contiguous array: summed in order, as ggml's loop
        suml2 = ((w * l) * l).sum(axis=0)
        return l, sumlx, suml2

    l, sumlx, suml2 = trial(np.float32(-_NMAX) / vmax)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, np.float32(0)).astype(np.float32)
    best = scale * sumlx
    codes = l
    for t in range(-9, 10):
        if t == 0:
            continue
        iscale = -(np.float32(_NMAX) + np.float32(0.1) * np.float32(t)) / vmax
        l, sumlx, suml2 = trial(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        if better.any():
            with np.errstate(divide="ignore", invalid="ignore"):
                new_scale = sumlx / suml2
            scale = np.where(better, new_scale, scale)
            best = np.where(better, new_scale * sumlx, best)
            codes = np.where(better, l, codes)
    scale = np.where(live, scale, np.float32(0))
    codes = np.where(live, codes + _NMAX, 0).astype(np.uint8)
    return scale, codes


def _quantize_chunk(x: np.ndarray) -> np.ndarray:
    """Q6_K blocks ``[n_blocks, 210]`` (uint8) of ``x`` ``[n_blocks, 256]`` (float32, finite)."""
    nb = x.shape[0]
    xs = np.ascontiguousarray(x.reshape(nb * _SUB, _SUB).T)  # [16 values, n_sub]: sums run over axis 0
    sub_scale, codes = _make_qx_quants(xs)
    sub_scale = sub_scale.reshape(nb, _SUB)
    idx = np.abs(sub_scale).argmax(axis=1)
    max_scale = sub_scale[np.arange(nb), idx]
    live = np.abs(max_scale) >= _GROUP_MAX_EPS
    max_scale = np.where(live, max_scale, np.float32(1))
    iscale = np.float32(-128) / max_scale
    d16 = np.where(live, np.float32(1) / iscale, np.float32(0)).astype(np.float16)
    scales = np.clip(_nearest_int(iscale[:, None] * sub_scale), -128, 127).astype(np.int8)  # ggml: MIN(127, .)
    scales[~live] = 0
    # final codes against d * scales[j]; a sub-block whose scale is zero keeps make_qx_quants' codes (as ggml)
    d_sub = (d16.astype(np.float32)[:, None] * scales.astype(np.float32)).reshape(nb * _SUB)  # [n_sub]
    nonzero = d_sub != 0
    l = np.clip(_nearest_int(xs / np.where(nonzero, d_sub, np.float32(1))), -_NMAX, _NMAX - 1)
    codes = np.where(nonzero, (l + _NMAX).astype(np.uint8), codes)
    codes = codes.T.reshape(nb, Q6_K_BLOCK)
    codes[~live] = 0
    q = codes.reshape(nb, 2, 4, 32)  # [block, half, quarter, l]
    ql = ((q[:, :, 0:2] & 0x0F) | ((q[:, :, 2:4] & 0x0F) << 4)).reshape(nb, Q6_K_BLOCK // 2)
    hi = q >> 4
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(nb, Q6_K_BLOCK // 4)
    return np.concatenate([ql, qh, scales.view(np.uint8), d16.reshape(nb, 1).view(np.uint8)], axis=1)


def quantize_q6_k(
    values: np.ndarray, progress: Callable[[Iterable[int]], Iterable[int]] | None = None
) -> np.ndarray:
    """The Q6_K bytes ``[N, K // 256 * 210]`` (uint8) of a float matrix ``values`` ``[N, K]`` (see the module doc).

    ``progress`` wraps the iterable of row-chunk starts (a ``tqdm``, for example). Refuses (``ValueError``) a
    matrix that is not 2-D, rows that are not a multiple of 256 long, NaN or infinite values, and values so
    large that the fp16 block scale overflows (``|x|`` beyond about 2.6e8).
    """
    x = np.asarray(values)
    if x.ndim != 2:
        raise ValueError(f"Q6_K quantizes a 2-D matrix [N, K], got shape {x.shape}")
    n, k = x.shape
    if k % Q6_K_BLOCK != 0:
        raise ValueError(f"Q6_K needs rows whose length is a multiple of {Q6_K_BLOCK}; got rows of {k} values")
    out = np.empty((n, (k // Q6_K_BLOCK) * Q6_K_BLOCK_BYTES), dtype=np.uint8)
    rows_per_chunk = max(1, _CHUNK_VALUES // max(k, 1))
    starts: Iterable[int] = range(0, n, rows_per_chunk)
    if progress is not None:
        starts = progress(starts)
    for start in starts:
        chunk = np.asarray(x[start:start + rows_per_chunk], dtype=np.float32)
        if not np.isfinite(chunk).all():
            bad = np.argwhere(~np.isfinite(chunk))[0]
            raise ValueError(
                f"Q6_K cannot store non-finite values: row {start + int(bad[0])}, column {int(bad[1])} is "
                f"{chunk[tuple(bad)]}"
            )
        amax = float(np.abs(chunk).max(initial=0.0))
        if amax > _MAX_MAGNITUDE:
            raise ValueError(
                f"Q6_K's fp16 block scale (about max|x| / 4000) cannot hold values of magnitude {amax:.3g} "
                f"(limit {_MAX_MAGNITUDE:.3g})"
            )
        blocks = _quantize_chunk(chunk.reshape(-1, Q6_K_BLOCK))
        if not np.isfinite(blocks[:, -2:].copy().view(np.float16)).all():
            raise ValueError(f"Q6_K's fp16 block scale overflowed for values of magnitude {amax:.3g}")
        out[start:start + len(chunk)] = blocks.reshape(len(chunk), -1)
    return out
