// bitnet CPU kernels: the torch-free interface shared by every ISA implementation.
//
// Layouts (SPEC.md §1, §3):
//   * activations x: row-major [M, K] float (fp32 / bf16 / fp16 bits), rows contiguous.
//   * x_q: row-major int8 [M, lda] (lda >= K; columns K..lda-1, when present, are zero). Kernels that read
//     x_q four bytes at a time need lda to be a multiple of 4 (the ATen binding pads).
//   * packed ternary weight: uint8 [P, K], P = N/4; packed[p, k] = sum_i (W[i*P + p, k] + 1) << 2i, so one
//     byte holds column k of the four output rows p, P+p, 2P+p, 3P+p. Codes are w+1 in {0, 1, 2}.
//   * int8 weight: row-major int8 [N, K], one fp32 scale per row.
//
// Contract (identical to bitnet_torch/_reference_ops.py, bit for bit):
//   quantize:  a = max(max_k |x_k|, 1e-5f); inv = (1.0f / a) * 127.0f  (torch's `127 / tensor` is
//              reciprocal-then-multiply); x_q = clamp(round_half_even(x * inv), -128, 127);
//              scale = a / 127.0f.
//              Non-finite values propagate as in bitnet_torch/quant.py (torch.amax and torch.clamp keep NaN,
//              torch's float -> int8 conversion turns NaN into 0):
//                * a row holding a NaN: a = NaN, scale = NaN, inv = NaN, every code 0 (NaN * anything = NaN -> 0);
//                * a row holding +-inf and no NaN: a = +inf, scale = +inf, inv = 0, every code 0 (a finite x
//                  gives x * 0 = 0, an infinite one inf * 0 = NaN -> 0);
//              so a linear's outputs for such a row are float(0) * (scale * w_scale) = NaN (+ bias), as in the
//              reference and nn.Linear. A NaN or infinite weight scale likewise reaches the epilogue unchanged.
//              The SIMD quantizers take the absmax as the integer maximum of the |x| bit patterns (NaN sorts
//              above +inf: scalar_common.h magnitude_max) and write the zero codes of a non-finite row
//              directly, so their code loop only ever sees finite products.
//   ternary:   acc[m, n] = sum_k x_q[m, k] * W[n, k] (exact int32), computed as
//              sum_k code[n, k] * x_q[m, k] - sum_k x_q[m, k].
//   int8:      acc[m, n] = sum_k x_q[m, k] * w[n, k] (exact int32).
//   epilogue:  y = float(acc) * (x_scale[m] * w_scale[n or 0]) (+ bias[n]), fp32 multiply then add
//              (never fused: this code is compiled with -ffp-contract=off), then rounded to the output
//              dtype with round-to-nearest-even. Or the raw int32 accumulator when the output is int32.
//
// Every kernel works on a sub-range of rows/columns so that the caller can split the work across threads;
// kernels never allocate more than a per-call scratch tile and never touch torch.
#pragma once

#include <cstddef>
#include <cstdint>

namespace bitnet_cpu {

//! The element type of a float tensor handed to a kernel.
enum class FloatKind : int { F32 = 0, BF16 = 1, F16 = 2 };

//! Where and how a kernel writes its results (the fused epilogue).
struct OutputSpec {
  void* out = nullptr;          //!< [M, ldo] row-major, element type given by out_int32 / out_kind
  int64_t ldo = 0;              //!< row stride of out, in elements
  bool out_int32 = false;       //!< true: store the raw accumulator (int32) and ignore the scales
  FloatKind out_kind = FloatKind::F32;
  const float* x_scale = nullptr;  //!< [M] per-token activation scales
  const float* w_scale = nullptr;  //!< [N] per-row weight scales, or [1] when w_scale_per_col is false
  bool w_scale_per_col = false;
  const float* bias = nullptr;     //!< [N] fp32, or null
};

//! Quantize rows [r0, r1) of x [*, K] (row stride K) into x_q (row stride lda) and scale; when row_sum is
//! not null also store sum_k x_q[r, k] (the correction term of the ternary kernels).
using QuantizeRowsFn = void (*)(const void* x, FloatKind kind, int64_t K, int64_t r0, int64_t r1, int8_t* x_q,
                                int64_t lda, float* scale, int32_t* row_sum);

//! Ternary matmul of rows [m0, m1) of x_q against packed rows [p0, p1): writes output columns i*P + p.
//! x_sum[m] = sum_k x_q[m, k].
using TernaryGemmFn = void (*)(const int8_t* x_q, int64_t lda, const int32_t* x_sum, int64_t K, int64_t m0,
                               int64_t m1, const uint8_t* packed, int64_t P, int64_t p0, int64_t p1,
                               const OutputSpec& out);

//! int8 matmul of rows [m0, m1) of x_q against weight rows [n0, n1) of w [N, K].
using Int8GemmFn = void (*)(const int8_t* x_q, int64_t lda, int64_t K, int64_t m0, int64_t m1, const int8_t* w,
                            int64_t n0, int64_t n1, const OutputSpec& out);

//! Ternarize rows [r0, r1) of a float weight [N, K] with scale s (clamp(round(w / s), -1, 1)) and pack them:
//! row r goes to slot r / P of packed row r % P. The caller zero-initialises packed.
using PackRowsFn = void (*)(const void* w, FloatKind kind, int64_t K, float scale, int64_t P, int64_t r0, int64_t r1,
                            uint8_t* packed);

//! The decode engine's attention scores of G query heads q [G, D] (fp32) against the cache rows [0, len) of one
//! KV head (keys [len, D], bf16 bits when bf16 else fp32): scores[g * len + j] = scale * (q_g . k_j) in fp32.
using AttentionScoresFn = void (*)(const float* q, int64_t G, const void* keys, bool bf16, int64_t len, int64_t D,
                                   float scale, float* scores);
//! ... and the probability-weighted values: acc[g * D + i] += sum_j p[g * len + j] * v_j[i] in fp32.
using AttentionValuesFn = void (*)(const float* p, int64_t G, const void* values, bool bf16, int64_t len, int64_t D,
                                   float* acc);

//! One ISA's implementation of every kernel.
struct KernelTable {
  const char* name;
  QuantizeRowsFn quantize_rows;
  TernaryGemmFn ternary_gemm;
  Int8GemmFn int8_gemm;
  PackRowsFn pack_rows;
  //! Attention loops of the decode engine, or null: the engine's portable loops (fp32 sums in another order).
  AttentionScoresFn attention_scores = nullptr;
  AttentionValuesFn attention_values = nullptr;
};

const KernelTable& scalar_kernels();
const KernelTable* avx2_kernels();    //!< null when the library was built without x86 SIMD support
const KernelTable* avx512_kernels();  //!< null when the library was built without x86 SIMD support
const KernelTable* amx_kernels();     //!< AVX-512 table whose prefill runs on AMX-INT8 tiles; null likewise

//! Bound on K for the ternary kernels: the AVX-512 / AMX paths accumulate slot 3 as 64 * sum(code * x),
//! and |sum| <= 2 * 128 * K must stay below 2^25 for that to fit an int32 lane, so K < 2^17.
constexpr int64_t kMaxTernaryK = int64_t(1) << 17;
//! Bound on K for the int8 kernels: |sum_k x_q * w| <= 128 * 128 * K must fit an int32 accumulator, so
//! K < 2^17 (the same bound as kMaxTernaryK; bitnet_torch/_op_checks.py MAX_K).
constexpr int64_t kMaxInt8K = int64_t(1) << 17;
//! Number of packed rows (16 output rows each x 4 slots) one prefill tile covers; callers split P on it.
constexpr int64_t kTernaryTileP = 16;
//! Number of tokens up to which the ternary / int8 kernels use their streaming (GEMV) path: each weight row
//! streamed once and re-read from L1 by every further group of tokens. Up to 16 it beats the transposed-tile
//! prefill path (measured on AVX-512, 2B-4T shapes, weights streamed from memory: at 16 tokens 4.3 G vpdpbusd/s
//! for the tile path against ~7 for the streaming one), so batched decode of up to 16 sequences takes it.
constexpr int64_t kDecodeMaxRows = 16;

}  // namespace bitnet_cpu
