// bitnet CPU kernels: AVX-512 (F, BW, VL, DQ) + VNNI implementation, and its AMX-INT8 prefill variant.
//
// Compiled for AVX-512 (and AMX) through a target pragma (never through -march), so the library runs on any
// x86-64 CPU: isa.cpp only hands out the "avx512" table when cpuid reports avx512f/bw/vl/dq/vnni and the OS
// saves zmm state, and the "amx" table (same decode and quantizer, prefill on AMX tiles: see the AMX section)
// only when cpuid reports amx-tile/amx-int8 and the kernel granted the tile state.
//
// Layout and numeric contract: kernel_api.h. How the ternary kernels use the packed layout:
//   * a packed byte b holds the codes (w + 1) of four output rows in bit pairs. Instead of shifting, each
//     slot is isolated with a mask, (b & (3 << 2i)) = code_i << 2i, which is still an unsigned byte (<= 192),
//     and fed to vpdpbusd as the unsigned operand against the signed int8 activations. The accumulator of
//     slot i is then 4^i * sum_k code_i * x_k exactly (|4^i * sum| <= 64 * 256 * K < 2^31 for
//     K < kMaxTernaryK = 2^17), so an arithmetic shift right by 2i recovers the sum; subtracting sum_k x_k turns
//     codes back into ternary values.
//   * decode (M <= kDecodeMaxRows): the packed rows are walked in chunks of kTernaryTileP rows and the tokens
//     in groups of up to four; each row group is streamed from memory once, by the first token group (which
//     prefetches the next row group into L2: the hardware prefetchers alone leave the stream at ~60% of the
//     memory bandwidth), and the other groups re-read it from L1 right away. Up to four packed rows at a time
//     keep 16 vpdpbusd chains in flight; the slot sums of a chunk are reduced once per row and written 16
//     output columns at a time through the vector epilogue.
//   * prefill: a tile of 16 packed rows (64 output rows, 4 slots x 16) is transposed once into a scratch
//     buffer of dwords [K/4][16] (gather), then reused for every token: per 4 columns the micro-kernel
//     loads one zmm, derives the 4 slot vectors and runs 4 vpdpbusd per token against a broadcast dword of
//     activations, for 6 tokens at a time (24 accumulators).
// The int8 kernels (lm_head) feed x + 128 as the unsigned operand and the int8 weight as the signed one, and
// subtract 128 * sum_k w[n, k], which they compute in the same pass (another vpdpbusd against ones).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>

#include "kernel_api.h"
#include "prefetch.h"
#include "scalar_common.h"

#if defined(__x86_64__) || defined(_M_X64)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi,bmi2,amx-tile,amx-int8"))), \
                             apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC diagnostic push
// GCC's intrinsic headers trip these on _mm512_undefined_*() placeholders.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi,bmi2,amx-tile,amx-int8")
#endif
#include <immintrin.h>

#include "attention_simd.h"

namespace bitnet_cpu {
namespace {

//! acc + vpdpbusd(u8 u, s8 s). Inline asm: GCC 12 wraps the intrinsic's tied operand in register copies and
//! keeps every accumulator of an unrolled micro-kernel on the stack.
inline __m512i dpbusd(__m512i acc, __m512i u, __m512i s) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
  return acc;
}

inline __mmask64 tail_mask64(int64_t n) { return n >= 64 ? ~__mmask64(0) : ((__mmask64(1) << n) - 1); }
inline __mmask16 tail_mask16(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// ---------------------------------------------------------------------------------------------- quantize

inline __m512 load16(const void* base, FloatKind kind, int64_t i, __mmask16 mask) {
  switch (kind) {
    case FloatKind::BF16: {
      const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(base) + i);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    case FloatKind::F16: {
      const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(base) + i);
      return _mm512_cvtph_ps(h);
    }
    default: return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(base) + i);
  }
}

template <FloatKind KIND>
inline __m512 load16_full(const void* base, int64_t i) {
  if constexpr (KIND == FloatKind::BF16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else if constexpr (KIND == FloatKind::F16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i)));
  } else {
    return _mm512_loadu_ps(static_cast<const float*>(base) + i);
  }
}

//! |v| as int32 bit patterns: for magnitudes (and NaN, which sorts above +inf) the integer order is the float
//! order, so an integer max propagates NaN where max_ps would drop it (scalar_common.h magnitude_max).
inline __m512i magnitude_bits(__m512 v) {
  return _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF));
}

template <FloatKind KIND>
int32_t quantize_row(const void* x, int64_t K, int8_t* q, float* scale) {
  __m512i vmax0 = _mm512_setzero_si512(), vmax1 = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    vmax0 = _mm512_max_epi32(vmax0, magnitude_bits(load16_full<KIND>(x, k)));
    vmax1 = _mm512_max_epi32(vmax1, magnitude_bits(load16_full<KIND>(x, k + 16)));
  }
  for (; k < K; k += 16)
    vmax0 = _mm512_max_epi32(vmax0, magnitude_bits(load16(x, KIND, k, tail_mask16(K - k))));
  const float absmax = bits_float(uint32_t(_mm512_reduce_max_epi32(_mm512_max_epi32(vmax0, vmax1))));
  if (nonfinite_absmax(absmax)) return quantize_nonfinite_row(K, q, absmax, scale);
  const __m512 inv = _mm512_set1_ps(activation_inverse_scale(absmax));
  const __m512 lo = _mm512_set1_ps(kActQmin), hi = _mm512_set1_ps(kActQmax);
  __m512i sum = _mm512_setzero_si512();
  for (k = 0; k < K; k += 16) {
    const __mmask16 mask = tail_mask16(K - k);
    const __m512 v = k + 16 <= K ? load16_full<KIND>(x, k) : load16(x, KIND, k, mask);
    const __m512 c = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, inv), lo), hi);
    const __m512i i32 = _mm512_cvt_roundps_epi32(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    sum = _mm512_add_epi32(sum, i32);
    _mm512_mask_cvtsepi32_storeu_epi8(q + k, mask, i32);
  }
  *scale = activation_scale(absmax);
  return _mm512_reduce_add_epi32(sum);
}

void quantize_rows(const void* x, FloatKind kind, int64_t K, int64_t r0, int64_t r1, int8_t* x_q, int64_t lda,
                   float* scale, int32_t* row_sum) {
  const int64_t elem = kind == FloatKind::F32 ? 4 : 2;
  for (int64_t r = r0; r < r1; ++r) {
    const void* row = static_cast<const char*>(x) + r * K * elem;
    int32_t s;
    switch (kind) {
      case FloatKind::BF16: s = quantize_row<FloatKind::BF16>(row, K, x_q + r * lda, scale + r); break;
      case FloatKind::F16: s = quantize_row<FloatKind::F16>(row, K, x_q + r * lda, scale + r); break;
      default: s = quantize_row<FloatKind::F32>(row, K, x_q + r * lda, scale + r);
    }
    if (row_sum != nullptr) row_sum[r] = s;
  }
}

// ---------------------------------------------------------------------------------------------- epilogue

//! Store 16 int32 accumulators of row m, columns [col, col + 16) masked, through the fused epilogue.
//! ws: per-column scales (nullptr: the scalar out.w_scale[0]).
inline void store16(const OutputSpec& o, int64_t m, int64_t col, __m512i acc, __mmask16 mask) {
  if (o.out_int32) {
    _mm512_mask_storeu_epi32(static_cast<int32_t*>(o.out) + m * o.ldo + col, mask, acc);
    return;
  }
  __m512 s;
  if (o.w_scale_per_col) {
    s = _mm512_mul_ps(_mm512_set1_ps(o.x_scale[m]), _mm512_maskz_loadu_ps(mask, o.w_scale + col));
  } else {
    s = _mm512_set1_ps(o.x_scale[m] * o.w_scale[0]);
  }
  __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), s);
  if (o.bias != nullptr) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, o.bias + col));
  const int64_t i = m * o.ldo + col;
  switch (o.out_kind) {
    case FloatKind::BF16: {
      const __m512i u = _mm512_castps_si512(y);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
      r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(o.out) + i, mask, _mm512_cvtepi32_epi16(r));
      break;
    }
    case FloatKind::F16:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(o.out) + i, mask,
                               _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
    default: _mm512_mask_storeu_ps(static_cast<float*>(o.out) + i, mask, y);
  }
}

// ---------------------------------------------------------------------------------------------- ternary

//! The four int32 sums of four accumulators, as the lanes of one __m128i (v0 in lane 0).
inline __m128i reduce4(__m512i v0, __m512i v1, __m512i v2, __m512i v3) {
  const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(v0, v1), _mm512_unpackhi_epi32(v0, v1));
  const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(v2, v3), _mm512_unpackhi_epi32(v2, v3));
  const __m512i t2 = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
  const __m256i u = _mm256_add_epi32(_mm512_castsi512_si256(t2), _mm512_extracti64x4_epi64(t2, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
}

//! The I-th of four values (vectors or masks) held in named variables.
template <int I, typename T>
inline T pick(T v0, T v1, T v2, T v3) {
  if constexpr (I == 0) return v0;
  else if constexpr (I == 1) return v1;
  else if constexpr (I == 2) return v2;
  else return v3;
}

//! Mask of the first n bytes of a 64-byte block (none when n <= 0).
inline __mmask64 block_mask64(int64_t n) { return n <= 0 ? __mmask64(0) : tail_mask64(n); }

// Named accumulators (GCC keeps arrays of vectors on the stack), one vector per slot: accumulator q covers token
// q / U and the column block k + 64 (q % U) of each step of 64 U columns. With fewer than three tokens the
// columns are unrolled (U = 4 / MT) so that 16 vpdpbusd chains stay in flight: a lone token read from cache ran
// at half the speed with 4 chains (the 100m shape's weights live in L3).
#define BN_DECL_ACC(q) __m512i acc##q##_0 = zero, acc##q##_1 = zero, acc##q##_2 = zero, acc##q##_3 = zero;
#define BN_DECODE_STEP(q)                                                                          \
  if constexpr (q < MT * U) {                                                                      \
    const __m512i xq = _mm512_maskz_loadu_epi8(pick<q % U>(mask0, mask1, mask2, mask3),             \
                                               x_q + (m0 + q / U) * lda + k + 64 * (q % U));         \
    const __m512i b = pick<q % U>(b0, b1, b2, b3);                                                 \
    acc##q##_0 = dpbusd(acc##q##_0, _mm512_and_si512(b, m0x03), xq);                               \
    acc##q##_1 = dpbusd(acc##q##_1, _mm512_and_si512(b, m0x0c), xq);                               \
    acc##q##_2 = dpbusd(acc##q##_2, _mm512_and_si512(b, m0x30), xq);                               \
    acc##q##_3 = dpbusd(acc##q##_3, _mm512_and_si512(b, m0xc0), xq);                               \
  }
#define BN_DECODE_FOLD(d, s)                                                                       \
  acc##d##_0 = _mm512_add_epi32(acc##d##_0, acc##s##_0);                                           \
  acc##d##_1 = _mm512_add_epi32(acc##d##_1, acc##s##_1);                                           \
  acc##d##_2 = _mm512_add_epi32(acc##d##_2, acc##s##_2);                                           \
  acc##d##_3 = _mm512_add_epi32(acc##d##_3, acc##s##_3);
#define BN_DECODE_STORE(q)                                                                         \
  if constexpr (q < MT * U && q % U == 0) {                                                        \
    const __m128i sums = _mm_srav_epi32(reduce4(acc##q##_0, acc##q##_1, acc##q##_2, acc##q##_3), shifts); \
    _mm_store_si128(reinterpret_cast<__m128i*>(slot_sums + (q / U) * 4 * kTernaryTileP), sums);     \
  }

//! Decode: MT <= 4 tokens (rows m0..m0+MT-1) against packed row `row` (16 accumulators). Stores the slot sums
//! sum_k code_i[p, k] * x_q[m0 + t, k] (before the x_sum correction) at slot_sums[t * 4 * kTernaryTileP + i].
//! next_row (or null): the row this thread streams next; each of its lines in columns [ahead_k0, ahead_k1) is
//! prefetched into L2 at the same offset as the line being read now, so the prefetches run exactly one row
//! ahead of the loads whatever K is (the L2 streamer alone keeps too few misses in flight: ~60% of the
//! bandwidth). The token groups of a batch split the columns, so that prefetches are issued all the time.
template <int MT>
inline void ternary_decode_row(const int8_t* x_q, int64_t lda, int64_t K, int64_t m0, const uint8_t* row,
                               int32_t* slot_sums, const uint8_t* next_row, int64_t ahead_k0, int64_t ahead_k1) {
  static_assert(MT >= 1 && MT <= 4, "1..4 tokens");
  constexpr int U = MT == 1 ? 4 : MT == 2 ? 2 : 1;
  const __m512i m0x03 = _mm512_set1_epi8(0x03), m0x0c = _mm512_set1_epi8(0x0C), m0x30 = _mm512_set1_epi8(0x30),
                m0xc0 = _mm512_set1_epi8(char(0xC0)), zero = _mm512_setzero_si512();
  const __m128i shifts = _mm_setr_epi32(0, 2, 4, 6);
  BN_DECL_ACC(0) BN_DECL_ACC(1) BN_DECL_ACC(2) BN_DECL_ACC(3)
  const char* ahead = reinterpret_cast<const char*>(next_row);
  for (int64_t k = 0; k < K; k += 64 * U) {
    const __mmask64 mask0 = block_mask64(K - k), mask1 = U > 1 ? block_mask64(K - k - 64) : 0,
                    mask2 = U > 2 ? block_mask64(K - k - 128) : 0, mask3 = U > 3 ? block_mask64(K - k - 192) : 0;
    if (ahead != nullptr)
      for (int u = 0; u < U; ++u)
        if (k + 64 * u >= ahead_k0 && k + 64 * u < ahead_k1) _mm_prefetch(ahead + k + 64 * u, _MM_HINT_T1);
    const __m512i b0 = _mm512_maskz_loadu_epi8(mask0, row + k);
    const __m512i b1 = U > 1 ? _mm512_maskz_loadu_epi8(mask1, row + k + 64) : zero;
    const __m512i b2 = U > 2 ? _mm512_maskz_loadu_epi8(mask2, row + k + 128) : zero;
    const __m512i b3 = U > 3 ? _mm512_maskz_loadu_epi8(mask3, row + k + 192) : zero;
    BN_DECODE_STEP(0) BN_DECODE_STEP(1) BN_DECODE_STEP(2) BN_DECODE_STEP(3)
  }
  if constexpr (U == 4) {
    BN_DECODE_FOLD(0, 1) BN_DECODE_FOLD(2, 3) BN_DECODE_FOLD(0, 2)
  } else if constexpr (U == 2) {
    BN_DECODE_FOLD(0, 1) BN_DECODE_FOLD(2, 3)
  }
  BN_DECODE_STORE(0) BN_DECODE_STORE(1) BN_DECODE_STORE(2) BN_DECODE_STORE(3)
}
#undef BN_DECL_ACC
#undef BN_DECODE_STEP
#undef BN_DECODE_FOLD
#undef BN_DECODE_STORE

//! ternary_decode_row<mt> for a runtime mt <= 4.
inline void ternary_decode_row_dyn(int mt, const int8_t* x_q, int64_t lda, int64_t K, int64_t m0, const uint8_t* row,
                                   int32_t* slot_sums, const uint8_t* next_row, int64_t k0, int64_t k1) {
  switch (mt) {
    case 1: ternary_decode_row<1>(x_q, lda, K, m0, row, slot_sums, next_row, k0, k1); break;
    case 2: ternary_decode_row<2>(x_q, lda, K, m0, row, slot_sums, next_row, k0, k1); break;
    case 3: ternary_decode_row<3>(x_q, lda, K, m0, row, slot_sums, next_row, k0, k1); break;
    default: ternary_decode_row<4>(x_q, lda, K, m0, row, slot_sums, next_row, k0, k1); break;
  }
}

//! The token groups of a decode call: M <= kDecodeMaxRows tokens in ceil(M / 4) groups of balanced sizes
//! (5 -> 3 + 2, 8 -> 4 + 4), group g holding tokens [first[g], first[g] + size[g]) and prefetching columns
//! [split[g], split[g + 1]) of the weight rows ahead (prefetch.h prefetch_share_begin).
struct TokenGroups {
  TokenGroups(int64_t M, int64_t K) : count(int((M + 3) / 4)) {
    for (int g = 0, at = 0; g < count; ++g) {
      size[g] = int(M / count + (g < M % count ? 1 : 0));
      first[g] = at;
      at += size[g];
    }
    for (int g = 0; g <= count; ++g) split[g] = prefetch_share_begin(K, g, count);
  }
  int count;
  int size[kDecodeMaxRows], first[kDecodeMaxRows];
  int64_t split[kDecodeMaxRows + 1];
};

//! How far ahead the decode loops prefetch, in bytes of weight rows (whole rows, at least one). Measured on Zen 5
//! (AVX-512, weights streamed from memory, 1 thread): one row ahead kept too few lines in flight on the 2B-4T
//! shapes; the int8 lm_head (2560-byte rows) went from 32-35 to 41-43 GB/s with three rows ahead, the ternary
//! 6912 x 2560 weight from 33-36 to 36-38 GB/s with two; at 2 threads both stay at 44-51 GB/s.
constexpr int64_t kTernaryAheadBytes = 5120;
constexpr int64_t kInt8AheadBytes = 7680;

//! Decode of the M = m1 - m0 <= kDecodeMaxRows tokens against the np <= kTernaryTileP packed rows
//! [pc, pc + np). The tokens form ceil(M / 4) groups of balanced sizes (5 -> 3 + 2, 8 -> 4 + 4). Each packed
//! row is streamed from memory once, by the first token group, and re-read from L1 by the other groups right
//! away; every group prefetches its share of a later row's columns (kTernaryAheadBytes ahead), so the memory
//! stream never pauses while later groups compute (with the token groups outside the rows it stopped for every
//! group after the first: at B = 8 a step took the memory time plus the compute time of the second group). The slot sums of the whole
//! chunk are collected first, then written 16 output columns at a time through the vector epilogue.
void ternary_decode_chunk(const int8_t* x_q, int64_t lda, const int32_t* x_sum, int64_t K, int64_t m0, int64_t m1,
                          const uint8_t* packed, int64_t P, int64_t pc, int64_t np, int64_t p_end,
                          const OutputSpec& out) {
  const int64_t M = m1 - m0;
  const TokenGroups groups(M, K);
  // One packed row per call, also for one or two tokens: measured on a 6912 x 2560 weight streamed from memory
  // (1 thread, AVX-512), 0.137 ms for one token against 0.149 with four rows per call, and 0.141 ms for two
  // tokens against 0.188 with two rows per call (more rows per call stream more pages at once, and prefetch less
  // far ahead in time).
  alignas(64) int32_t slot_sums[kDecodeMaxRows * 4 * kTernaryTileP];
  const int64_t ahead_rows = prefetch_rows_ahead(K, kTernaryAheadBytes);
  for (int64_t r = 0; r < np; ++r) {
    const uint8_t* next = rows_ahead(packed, pc + r + ahead_rows, 1, p_end, K);
    for (int g = 0; g < groups.count; ++g)
      ternary_decode_row_dyn(groups.size[g], x_q, lda, K, m0 + groups.first[g], packed + (pc + r) * K,
                             slot_sums + groups.first[g] * 4 * kTernaryTileP + r * 4, next, groups.split[g],
                             groups.split[g + 1]);
  }
  const __mmask16 mask = tail_mask16(np);
  const __m512i rows = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60);
  for (int64_t t = 0; t < M; ++t) {
    const __m512i corr = _mm512_set1_epi32(x_sum[m0 + t]);
    const int32_t* sums = slot_sums + t * 4 * kTernaryTileP;
    for (int i = 0; i < 4; ++i) {
      const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask,
                                                    _mm512_add_epi32(rows, _mm512_set1_epi32(i)), sums, 4);
      store16(out, m0 + t, i * P + pc, _mm512_sub_epi32(v, corr), mask);
    }
  }
}

#define BN_ROW_ACC(r) __m512i acc##r##_0 = zero, acc##r##_1 = zero, acc##r##_2 = zero, acc##r##_3 = zero;
#define BN_ROW_STEP(r)                                                   \
  if constexpr (MR > r) {                                                \
    int32_t a32;                                                         \
    std::memcpy(&a32, x + r * lda + kg * 4, 4);                          \
    const __m512i a = _mm512_set1_epi32(a32);                            \
    acc##r##_0 = dpbusd(acc##r##_0, c0, a);                 \
    acc##r##_1 = dpbusd(acc##r##_1, c1, a);                 \
    acc##r##_2 = dpbusd(acc##r##_2, c2, a);                 \
    acc##r##_3 = dpbusd(acc##r##_3, c3, a);                 \
  }
#define BN_ROW_STORE(r)                                                                          \
  if constexpr (MR > r) {                                                                        \
    const __m512i corr = _mm512_set1_epi32(x_sum[m + r]);                                        \
    store16(out, m + r, p, _mm512_sub_epi32(acc##r##_0, corr), mask);                            \
    store16(out, m + r, P + p, _mm512_sub_epi32(_mm512_srai_epi32(acc##r##_1, 2), corr), mask);  \
    store16(out, m + r, 2 * P + p, _mm512_sub_epi32(_mm512_srai_epi32(acc##r##_2, 4), corr), mask); \
    store16(out, m + r, 3 * P + p, _mm512_sub_epi32(_mm512_srai_epi32(acc##r##_3, 6), corr), mask); \
  }

//! Prefill micro-kernel: MR <= 6 tokens x (4 slots x 16 packed rows) over the whole K of a transposed tile.
template <int MR>
inline void ternary_micro(const int8_t* x, int64_t lda, const uint32_t* tile, int64_t KG, const int32_t* x_sum,
                          int64_t m, int64_t P, int64_t p, __mmask16 mask, const OutputSpec& out) {
  static_assert(MR >= 1 && MR <= 6, "micro-kernel handles 1..6 tokens");
  const __m512i m0x03 = _mm512_set1_epi8(0x03), m0x0c = _mm512_set1_epi8(0x0C), m0x30 = _mm512_set1_epi8(0x30),
                m0xc0 = _mm512_set1_epi8(char(0xC0)), zero = _mm512_setzero_si512();
  BN_ROW_ACC(0) BN_ROW_ACC(1) BN_ROW_ACC(2) BN_ROW_ACC(3) BN_ROW_ACC(4) BN_ROW_ACC(5)
  for (int64_t kg = 0; kg < KG; ++kg) {
    const __m512i b = _mm512_load_si512(tile + kg * 16);
    const __m512i c0 = _mm512_and_si512(b, m0x03), c1 = _mm512_and_si512(b, m0x0c), c2 = _mm512_and_si512(b, m0x30),
                  c3 = _mm512_and_si512(b, m0xc0);
    BN_ROW_STEP(0) BN_ROW_STEP(1) BN_ROW_STEP(2) BN_ROW_STEP(3) BN_ROW_STEP(4) BN_ROW_STEP(5)
  }
  BN_ROW_STORE(0) BN_ROW_STORE(1) BN_ROW_STORE(2) BN_ROW_STORE(3) BN_ROW_STORE(4) BN_ROW_STORE(5)
}
#undef BN_ROW_STEP
#undef BN_ROW_STORE

//! In-register transpose of a 16 x 16 matrix of dwords (r[j] = row j -> r[t] = column t).
inline void transpose16x16_epi32(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int g = 0; g < 4; ++g) {
    t[4 * g + 0] = _mm512_unpacklo_epi32(r[4 * g], r[4 * g + 1]);
    t[4 * g + 1] = _mm512_unpackhi_epi32(r[4 * g], r[4 * g + 1]);
    t[4 * g + 2] = _mm512_unpacklo_epi32(r[4 * g + 2], r[4 * g + 3]);
    t[4 * g + 3] = _mm512_unpackhi_epi32(r[4 * g + 2], r[4 * g + 3]);
  }
  for (int g = 0; g < 4; ++g) {  // u[4g + c], 128-bit lane L: column 4L + c of rows 4g..4g+3
    u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i a = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), b = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i a2 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE), b2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(a, b, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(a, b, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(a2, b2, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(a2, b2, 0xDD);
  }
}

//! Transpose byte rows [0, np) (row stride K) into dwords tile[kg * stride + j] = bytes 4kg..4kg+3 of row j,
//! for j < 16 and kg < KG = ceil(K / 4); rows past np and bytes past K are zero. 64 columns of 16 rows at a
//! time: 16 row loads and an in-register transpose (gathers are far slower).
inline void fill_dword_tile(const uint8_t* rows, int64_t K, int64_t np, int64_t KG, int64_t stride, uint32_t* tile) {
  __m512i r[16];
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mask = tail_mask64(K - k);
    for (int64_t j = 0; j < 16; ++j)
      r[j] = j < np ? _mm512_maskz_loadu_epi8(mask, rows + j * K + k) : _mm512_setzero_si512();
    transpose16x16_epi32(r);
    const int64_t kg0 = k / 4, count = std::min<int64_t>(16, KG - kg0);
    for (int64_t t = 0; t < count; ++t) _mm512_store_si512(tile + (kg0 + t) * stride, r[t]);
  }
}

struct AlignedBuffer {
  explicit AlignedBuffer(size_t bytes) : data(static_cast<uint8_t*>(::operator new(bytes + 64, std::align_val_t(64)))) {}
  ~AlignedBuffer() { ::operator delete(data, std::align_val_t(64)); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  uint8_t* data;
};

void ternary_gemm(const int8_t* x_q, int64_t lda, const int32_t* x_sum, int64_t K, int64_t m0, int64_t m1,
                  const uint8_t* packed, int64_t P, int64_t p0, int64_t p1, const OutputSpec& out) {
  if (m1 - m0 <= kDecodeMaxRows) {
    for (int64_t pc = p0; pc < p1; pc += kTernaryTileP)
      ternary_decode_chunk(x_q, lda, x_sum, K, m0, m1, packed, P, pc, std::min<int64_t>(kTernaryTileP, p1 - pc), p1,
                           out);
    return;
  }
  const int64_t KG = (K + 3) / 4;
  AlignedBuffer tile_buffer(size_t(KG) * 64);
  uint32_t* tile = reinterpret_cast<uint32_t*>(tile_buffer.data);
  constexpr int MR = 6;
  for (int64_t p = p0; p < p1; p += kTernaryTileP) {
    const int64_t np = std::min<int64_t>(kTernaryTileP, p1 - p);
    const __mmask16 mask = tail_mask16(np);
    fill_dword_tile(packed + p * K, K, np, KG, 16, tile);
    int64_t m = m0;
    for (; m + MR <= m1; m += MR) ternary_micro<MR>(x_q + m * lda, lda, tile, KG, x_sum, m, P, p, mask, out);
    switch (m1 - m) {
      case 5: ternary_micro<5>(x_q + m * lda, lda, tile, KG, x_sum, m, P, p, mask, out); break;
      case 4: ternary_micro<4>(x_q + m * lda, lda, tile, KG, x_sum, m, P, p, mask, out); break;
      case 3: ternary_micro<3>(x_q + m * lda, lda, tile, KG, x_sum, m, P, p, mask, out); break;
      case 2: ternary_micro<2>(x_q + m * lda, lda, tile, KG, x_sum, m, P, p, mask, out); break;
      case 1: ternary_micro<1>(x_q + m * lda, lda, tile, KG, x_sum, m, P, p, mask, out); break;
      default: break;
    }
  }
}

// ---------------------------------------------------------------------------------------------- int8

// Named accumulators: acc<u>_<t> covers token t and the column block k + 64 u of each step of 64 U columns;
// wsum<u> the same blocks of sum_k w[n, k] (a vpdpbusd against ones).
#define BN_I8_ACC(u) __m512i wsum##u = zero, acc##u##_0 = zero, acc##u##_1 = zero, acc##u##_2 = zero, acc##u##_3 = zero;
#define BN_I8_STEP(u, FULL)                                                                             \
  if constexpr (U > u) {                                                                                \
    const int64_t kk = k + 64 * u;                                                                      \
    const __mmask64 mask = FULL ? ~__mmask64(0) : block_mask64(K - kk);                                 \
    if (ahead != nullptr && kk >= ahead_k0 && kk < ahead_k1) _mm_prefetch(ahead + kk, _MM_HINT_T1);     \
    const __m512i wv = _mm512_maskz_loadu_epi8(mask, row + kk);                                         \
    if constexpr (WSUM) wsum##u = dpbusd(wsum##u, ones, wv);                                            \
    acc##u##_0 = dpbusd(acc##u##_0, _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, x + kk), flip), wv); \
    if constexpr (MT > 1)                                                                               \
      acc##u##_1 = dpbusd(acc##u##_1, _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, x + lda + kk), flip), wv); \
    if constexpr (MT > 2)                                                                               \
      acc##u##_2 = dpbusd(acc##u##_2, _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, x + 2 * lda + kk), flip), wv); \
    if constexpr (MT > 3)                                                                               \
      acc##u##_3 = dpbusd(acc##u##_3, _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, x + 3 * lda + kk), flip), wv); \
  }
#define BN_I8_FOLD(d, s)                                                                               \
  wsum##d = _mm512_add_epi32(wsum##d, wsum##s);                                                         \
  acc##d##_0 = _mm512_add_epi32(acc##d##_0, acc##s##_0);                                                \
  acc##d##_1 = _mm512_add_epi32(acc##d##_1, acc##s##_1);                                                \
  acc##d##_2 = _mm512_add_epi32(acc##d##_2, acc##s##_2);                                                \
  acc##d##_3 = _mm512_add_epi32(acc##d##_3, acc##s##_3);

//! Decode: MT <= 4 tokens against weight row n, streamed once. The activations enter as x + 128 (unsigned);
//! the correction 128 * sum_k w[n, k] comes from a vpdpbusd against ones in the same pass (WSUM, stored at
//! *correction) or, for a later token group of the same row, from *correction. The columns are unrolled
//! (U = 4 / MT, at least 2) for enough independent vpdpbusd chains.
//! next_row (or null): a row this thread streams later (kInt8AheadBytes ahead), whose columns [ahead_k0, ahead_k1)
//! are prefetched into L2 at the offset being read now. One row per call:
//! measured on the 2B-4T lm_head (128256 x 2560 int8, 1 thread, AVX-512) one row at a time streams at 40 GB/s,
//! four (one token) or two (three or four tokens) at 24 GB/s.
template <int MT, bool WSUM>
inline void int8_decode_row(const int8_t* x_q, int64_t lda, int64_t K, int64_t m0, const int8_t* w, int64_t n,
                            const OutputSpec& out, int32_t* correction, const int8_t* next_row, int64_t ahead_k0,
                            int64_t ahead_k1) {
  static_assert(MT >= 1 && MT <= 4, "1..4 tokens");
  constexpr int U = MT == 1 ? 4 : 2;
  const __m512i ones = _mm512_set1_epi8(1), flip = _mm512_set1_epi8(char(0x80)), zero = _mm512_setzero_si512();
  BN_I8_ACC(0) BN_I8_ACC(1) BN_I8_ACC(2) BN_I8_ACC(3)
  const char* ahead = reinterpret_cast<const char*>(next_row);
  const int8_t* row = w + n * K;
  const int8_t* x = x_q + m0 * lda;
  // Whole steps with plain loads; masked loads (and their per-step masks) only for the last, partial one. With a
  // mask per step the 2B-4T head ran at 37 GB/s even from L3 (1 thread, one token), without at 63 GB/s.
  int64_t k = 0;
  for (; k + 64 * U <= K; k += 64 * U) {
    BN_I8_STEP(0, true) BN_I8_STEP(1, true) BN_I8_STEP(2, true) BN_I8_STEP(3, true)
  }
  if (k < K) {
    BN_I8_STEP(0, false) BN_I8_STEP(1, false) BN_I8_STEP(2, false) BN_I8_STEP(3, false)
  }
  if constexpr (U == 4) {
    BN_I8_FOLD(0, 1) BN_I8_FOLD(2, 3) BN_I8_FOLD(0, 2)
  } else {
    BN_I8_FOLD(0, 1)
  }
  alignas(16) int32_t sums[4];
  _mm_store_si128(reinterpret_cast<__m128i*>(sums), reduce4(acc0_0, acc0_1, acc0_2, acc0_3));
  if constexpr (WSUM) *correction = _mm512_reduce_add_epi32(wsum0) * 128;
  for (int t = 0; t < MT; ++t) store_output(out, m0 + t, n, sums[t] - *correction);
}
#undef BN_I8_ACC
#undef BN_I8_STEP
#undef BN_I8_FOLD

//! int8_decode_row<mt, wsum> for a runtime mt <= 4.
inline void int8_decode_row_dyn(int mt, bool wsum, const int8_t* x_q, int64_t lda, int64_t K, int64_t m0,
                                const int8_t* w, int64_t n, const OutputSpec& out, int32_t* correction,
                                const int8_t* next_row, int64_t k0, int64_t k1) {
  switch (mt * 2 + int(wsum)) {
    case 2: int8_decode_row<1, false>(x_q, lda, K, m0, w, n, out, correction, next_row, k0, k1); break;
    case 3: int8_decode_row<1, true>(x_q, lda, K, m0, w, n, out, correction, next_row, k0, k1); break;
    case 4: int8_decode_row<2, false>(x_q, lda, K, m0, w, n, out, correction, next_row, k0, k1); break;
    case 5: int8_decode_row<2, true>(x_q, lda, K, m0, w, n, out, correction, next_row, k0, k1); break;
    case 6: int8_decode_row<3, false>(x_q, lda, K, m0, w, n, out, correction, next_row, k0, k1); break;
    case 7: int8_decode_row<3, true>(x_q, lda, K, m0, w, n, out, correction, next_row, k0, k1); break;
    case 8: int8_decode_row<4, false>(x_q, lda, K, m0, w, n, out, correction, next_row, k0, k1); break;
    default: int8_decode_row<4, true>(x_q, lda, K, m0, w, n, out, correction, next_row, k0, k1); break;
  }
}

//! Decode of the M = m1 - m0 <= kDecodeMaxRows tokens against weight rows [n0, n1): the tokens form
//! ceil(M / 4) groups of balanced sizes. With many tokens the rows go in blocks of kInt8DecodeBlock: every
//! group runs over the block in turn, so a group's activations stay in L1 (each 64 bytes of them feed a single
//! vpdpbusd, too little work to hide a read from L2 for every row) and the block's rows, streamed
//! from memory once by the first group (which also sums them for the correction), are re-read from L2 by the
//! others. Each group prefetches its share of the columns of the rows one block ahead, so the memory stream
//! never pauses while later groups compute; the weights cross the memory bus once whatever M is.
constexpr int64_t kInt8DecodeBlock = 16;

void int8_decode(const int8_t* x_q, int64_t lda, int64_t K, int64_t m0, int64_t m1, const int8_t* w, int64_t n0,
                 int64_t n1, const OutputSpec& out) {
  const int64_t M = m1 - m0;
  const TokenGroups groups(M, K);
  // Blocks only when the activations of all tokens outgrow a share of L1 (measured, 2B-4T head, 1 thread: 16
  // tokens 9% faster with blocks, 8 tokens 4% slower).
  const int64_t block = groups.count > 1 && M * K > 24 * 1024 ? kInt8DecodeBlock : 1;
  int32_t correction[kInt8DecodeBlock];
  const int64_t ahead = block * prefetch_rows_ahead(block * K, kInt8AheadBytes);
  for (int64_t nb = n0; nb < n1; nb += block) {
    const int64_t ne = std::min(n1, nb + block);
    for (int g = 0; g < groups.count; ++g)
      for (int64_t n = nb; n < ne; ++n)
        int8_decode_row_dyn(groups.size[g], g == 0, x_q, lda, K, m0 + groups.first[g], w, n, out,
                            &correction[n - nb], rows_ahead(w, n + ahead, 1, n1, K), groups.split[g],
                            groups.split[g + 1]);
  }
}

#define BN_I8M_STEP(r)                                                   \
  if constexpr (MR > r) {                                                \
    int32_t a32;                                                         \
    std::memcpy(&a32, xu + r * ldu + kg * 4, 4);                         \
    const __m512i a = _mm512_set1_epi32(a32);                            \
    acc##r##_0 = dpbusd(acc##r##_0, a, b0);                 \
    acc##r##_1 = dpbusd(acc##r##_1, a, b1);                 \
    acc##r##_2 = dpbusd(acc##r##_2, a, b2);                 \
    acc##r##_3 = dpbusd(acc##r##_3, a, b3);                 \
  }
#define BN_I8M_STORE(r)                                                                                     \
  if constexpr (MR > r) {                                                                                   \
    store16(out, m + r, n, _mm512_sub_epi32(acc##r##_0, corr[0]), tail_mask16(nn));                        \
    if (nn > 16) store16(out, m + r, n + 16, _mm512_sub_epi32(acc##r##_1, corr[1]), tail_mask16(nn - 16)); \
    if (nn > 32) store16(out, m + r, n + 32, _mm512_sub_epi32(acc##r##_2, corr[2]), tail_mask16(nn - 32)); \
    if (nn > 48) store16(out, m + r, n + 48, _mm512_sub_epi32(acc##r##_3, corr[3]), tail_mask16(nn - 48)); \
  }

//! Prefill micro-kernel: MR <= 6 tokens x 64 weight rows (4 vectors of 16) over a transposed tile [KG][64].
template <int MR>
inline void int8_micro(const uint8_t* xu, int64_t ldu, const uint32_t* tile, int64_t KG, const __m512i* corr, int64_t m,
                       int64_t n, int64_t nn, const OutputSpec& out) {
  static_assert(MR >= 1 && MR <= 6, "micro-kernel handles 1..6 tokens");
  const __m512i zero = _mm512_setzero_si512();
  BN_ROW_ACC(0) BN_ROW_ACC(1) BN_ROW_ACC(2) BN_ROW_ACC(3) BN_ROW_ACC(4) BN_ROW_ACC(5)
  for (int64_t kg = 0; kg < KG; ++kg) {
    const __m512i b0 = _mm512_load_si512(tile + kg * 64), b1 = _mm512_load_si512(tile + kg * 64 + 16),
                  b2 = _mm512_load_si512(tile + kg * 64 + 32), b3 = _mm512_load_si512(tile + kg * 64 + 48);
    BN_I8M_STEP(0) BN_I8M_STEP(1) BN_I8M_STEP(2) BN_I8M_STEP(3) BN_I8M_STEP(4) BN_I8M_STEP(5)
  }
  BN_I8M_STORE(0) BN_I8M_STORE(1) BN_I8M_STORE(2) BN_I8M_STORE(3) BN_I8M_STORE(4) BN_I8M_STORE(5)
}
#undef BN_ROW_ACC
#undef BN_I8M_STEP
#undef BN_I8M_STORE

void int8_gemm(const int8_t* x_q, int64_t lda, int64_t K, int64_t m0, int64_t m1, const int8_t* w, int64_t n0,
               int64_t n1, const OutputSpec& out) {
  if (m1 - m0 <= kDecodeMaxRows) {
    int8_decode(x_q, lda, K, m0, m1, w, n0, n1, out);
    return;
  }
  const int64_t KG = (K + 3) / 4, ldu = KG * 4;
  // Activations as unsigned bytes x + 128 (zero columns past K pair with zero weights).
  AlignedBuffer xu_buffer(size_t(m1 - m0) * size_t(ldu));
  uint8_t* xu = xu_buffer.data;
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* src = x_q + m * lda;
    uint8_t* dst = xu + (m - m0) * ldu;
    for (int64_t k = 0; k < ldu; ++k) dst[k] = uint8_t(int32_t(k < K ? src[k] : 0) + 128);
  }
  AlignedBuffer tile_buffer(size_t(KG) * 256);
  uint32_t* tile = reinterpret_cast<uint32_t*>(tile_buffer.data);
  const __m512i ones = _mm512_set1_epi8(1);
  constexpr int MR = 6;
  for (int64_t n = n0; n < n1; n += 64) {
    const int64_t nn = std::min<int64_t>(64, n1 - n);
    __m512i corr[4];
    for (int v = 0; v < 4; ++v) {
      const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(16, nn - v * 16));
      fill_dword_tile(reinterpret_cast<const uint8_t*>(w + (n + v * 16) * K), K, rows, KG, 64, tile + v * 16);
      __m512i s = _mm512_setzero_si512();
      for (int64_t kg = 0; kg < KG; ++kg) s = dpbusd(s, ones, _mm512_load_si512(tile + kg * 64 + v * 16));
      corr[v] = _mm512_slli_epi32(s, 7);  // 128 * sum_k w[n, k]
    }
    int64_t m = m0;
    for (; m + MR <= m1; m += MR) int8_micro<MR>(xu + (m - m0) * ldu, ldu, tile, KG, corr, m, n, nn, out);
    switch (m1 - m) {
      case 5: int8_micro<5>(xu + (m - m0) * ldu, ldu, tile, KG, corr, m, n, nn, out); break;
      case 4: int8_micro<4>(xu + (m - m0) * ldu, ldu, tile, KG, corr, m, n, nn, out); break;
      case 3: int8_micro<3>(xu + (m - m0) * ldu, ldu, tile, KG, corr, m, n, nn, out); break;
      case 2: int8_micro<2>(xu + (m - m0) * ldu, ldu, tile, KG, corr, m, n, nn, out); break;
      case 1: int8_micro<1>(xu + (m - m0) * ldu, ldu, tile, KG, corr, m, n, nn, out); break;
      default: break;
    }
  }
}

// ---------------------------------------------------------------------------------------------- attention
//
// The decode engine's attention loops (attention_simd.h) for head_dim a multiple of 16 (every released BitNet
// model: 64 or 128); other head dims take the engine's portable loops. Here: 16 lanes with fma, 4 keys x up to
// 4 query heads per scores pass, 4 heads x 32 columns of value sums. Measured, 2B-4T shape, 8 sequences at
// position 512, 1 thread: the attention of a step took 45 ms with the portable loops, 31 ms with these.

//! The four fp32 sums of four vectors, as the lanes of one __m128 (v0 in lane 0).
inline __m128 reduce4_ps(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(v2, v3), _mm512_unpackhi_ps(v2, v3));
  const __m512 t2 = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))),
                                  _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))));
  const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t2), 1));
  const __m256 u = _mm256_add_ps(_mm512_castps512_ps256(t2), high);
  return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

//! 16 cache values from column c of row j (bf16 widened) as fp32.
inline __m512 cache16(const void* rows, bool bf16, int64_t j, int64_t D, int64_t c) {
  if (bf16) {
    const uint16_t* at = static_cast<const uint16_t*>(rows) + j * D + c;
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_loadu_ps(static_cast<const float*>(rows) + j * D + c);
}

//! The shared attention loops (attention_simd.h) on 16 fp32 lanes with fma.
struct Avx512Floats {
  using reg = __m512;
  static constexpr int64_t kLanes = 16;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static reg splat(float v) { return _mm512_set1_ps(v); }
  static reg madd(reg a, reg b, reg acc) { return _mm512_fmadd_ps(a, b, acc); }
  static reg cache(const void* rows, bool bf16, int64_t j, int64_t D, int64_t c) { return cache16(rows, bf16, j, D, c); }
  static __m128 reduce4(reg v0, reg v1, reg v2, reg v3) { return reduce4_ps(v0, v1, v2, v3); }
};

void attention_scores(const float* q, int64_t G, const void* keys, bool bf16, int64_t len, int64_t D, float scale,
                      float* scores) {
  simd_attention_scores<Avx512Floats, 4>(q, G, keys, bf16, len, D, scale, scores);
}

void attention_values(const float* p, int64_t G, const void* values, bool bf16, int64_t len, int64_t D, float* acc) {
  simd_attention_values<Avx512Floats>(p, G, values, bf16, len, D, acc);
}

// ---------------------------------------------------------------------------------------------- AMX prefill
//
// With AMX-INT8 (tdpbusd: a 16x64 unsigned byte tile times a 16x(16x4) signed byte tile into 16x16 int32) the
// prefill runs on tiles instead of vpdpbusd. The unsigned operand (tile rows = tokens) is x + 128; the signed
// operand (tile rows = groups of 4 input columns, VNNI layout) is the weight itself: ternary values
// code - 1 in {-1, 0, 1} for the packed kernel, the int8 weight for the lm_head kernel. 128 * sum_k w[n, k]
// (computed while the weight tile is laid out) is subtracted in the epilogue. Tiles: tmm0..3 accumulate a
// 32-token x 32-output block, tmm4/5 hold two activation tiles, tmm6/7 two weight tiles; K is padded to a
// multiple of 64 (zero weights), tokens to a multiple of 32 (padding rows are computed and never stored).

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

//! Every tile 16 rows x 64 bytes (int32 accumulators: 16 x 16).
inline void configure_tiles() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

//! Activations of rows [m0, m1) as unsigned bytes x + 128, [round_up(m1 - m0, 32)][ldu] (ldu: K padded to 64).
inline void fill_unsigned_activations(const int8_t* x_q, int64_t lda, int64_t K, int64_t m0, int64_t m1, int64_t ldu,
                                      uint8_t* xu) {
  const int64_t rows = (m1 - m0 + 31) / 32 * 32;
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* dst = xu + r * ldu;
    if (m0 + r >= m1) {
      std::memset(dst, 0x80, size_t(ldu));
      continue;
    }
    const int8_t* src = x_q + (m0 + r) * lda;
    for (int64_t k = 0; k < ldu; k += 64) {
      const __m512i v = _mm512_maskz_loadu_epi8(tail_mask64(std::max<int64_t>(0, K - k)), src + k);
      _mm512_storeu_si512(dst + k, _mm512_xor_si512(v, flip));
    }
  }
}

//! 128 * sum over the rows of a [KGp][16] dword weight tile, per column (the x + 128 correction). KGp is a
//! multiple of 16; four accumulators keep vpdpbusd's latency out of the way.
inline __m512i unsigned_correction(const uint32_t* tile, int64_t KGp) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
  for (int64_t kg = 0; kg < KGp; kg += 4) {
    s0 = dpbusd(s0, ones, _mm512_load_si512(tile + kg * 16));
    s1 = dpbusd(s1, ones, _mm512_load_si512(tile + kg * 16 + 16));
    s2 = dpbusd(s2, ones, _mm512_load_si512(tile + kg * 16 + 32));
    s3 = dpbusd(s3, ones, _mm512_load_si512(tile + kg * 16 + 48));
  }
  return _mm512_slli_epi32(_mm512_add_epi32(_mm512_add_epi32(s0, s1), _mm512_add_epi32(s2, s3)), 7);
}

//! C[m, col_j + c] = sum_k xu[m, k] * B_j[k, c] - corr_j[c] for rows [0, rows) of xu, two weight tiles j.
inline void amx_pair(const uint8_t* xu, int64_t ldu, int64_t m0, int64_t rows, const uint32_t* b0, const uint32_t* b1,
                     __m512i corr0, __m512i corr1, int64_t col0, int64_t col1, __mmask16 mask0, __mmask16 mask1,
                     const OutputSpec& out) {
  alignas(64) int32_t c[32 * 32];
  const int64_t KGp = ldu / 4;
  for (int64_t m = 0; m < rows; m += 32) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const uint8_t* a = xu + m * ldu;
    for (int64_t kg = 0; kg < KGp; kg += 16) {
      // Loads interleaved with the products that need them (tiles are not renamed: a load waits for the
      // products still reading its register).
      _tile_loadd(4, a + kg * 4, ldu);
      _tile_loadd(6, b0 + kg * 16, 64);
      _tile_dpbusd(0, 4, 6);
      _tile_loadd(7, b1 + kg * 16, 64);
      _tile_dpbusd(1, 4, 7);
      _tile_loadd(5, a + 16 * ldu + kg * 4, ldu);
      _tile_dpbusd(2, 5, 6);
      _tile_dpbusd(3, 5, 7);
    }
    _tile_stored(0, c, 128);
    _tile_stored(1, c + 16, 128);
    _tile_stored(2, c + 16 * 32, 128);
    _tile_stored(3, c + 16 * 32 + 16, 128);
    const int64_t valid = std::min<int64_t>(32, rows - m);
    for (int64_t r = 0; r < valid; ++r) {
      if (mask0) store16(out, m0 + m + r, col0, _mm512_sub_epi32(_mm512_load_si512(c + r * 32), corr0), mask0);
      if (mask1) store16(out, m0 + m + r, col1, _mm512_sub_epi32(_mm512_load_si512(c + r * 32 + 16), corr1), mask1);
    }
  }
}

void ternary_gemm_amx(const int8_t* x_q, int64_t lda, const int32_t* x_sum, int64_t K, int64_t m0, int64_t m1,
                      const uint8_t* packed, int64_t P, int64_t p0, int64_t p1, const OutputSpec& out) {
  if (m1 - m0 <= kDecodeMaxRows) return ternary_gemm(x_q, lda, x_sum, K, m0, m1, packed, P, p0, p1, out);
  const int64_t KG = (K + 3) / 4, KGp = (KG + 15) / 16 * 16, ldu = KGp * 4;
  AlignedBuffer xu_buffer(size_t((m1 - m0 + 31) / 32 * 32) * size_t(ldu));
  fill_unsigned_activations(x_q, lda, K, m0, m1, ldu, xu_buffer.data);
  AlignedBuffer raw_buffer(size_t(KGp) * 64), slot_buffer(size_t(KGp) * 64 * 4);
  uint32_t* raw = reinterpret_cast<uint32_t*>(raw_buffer.data);
  uint32_t* slots = reinterpret_cast<uint32_t*>(slot_buffer.data);
  const __m512i low2 = _mm512_set1_epi8(0x03), one = _mm512_set1_epi8(1);
  configure_tiles();
  for (int64_t p = p0; p < p1; p += kTernaryTileP) {
    const int64_t np = std::min<int64_t>(kTernaryTileP, p1 - p);
    const __mmask16 mask = tail_mask16(np);
    fill_dword_tile(packed + p * K, K, np, KG, 16, raw);
    // Slot i of every byte as a signed weight tile (code - 1; bytes past K give -1 against x = 0, which the
    // correction cancels; padding rows are never stored), with 128 * its column sums.
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i sum[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int64_t kg = 0; kg < KG; ++kg) {
      const __m512i b = _mm512_load_si512(raw + kg * 16);
      for (int i = 0; i < 4; ++i) {
        const __m512i w = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi32(b, 2 * i), low2), one);
        _mm512_store_si512(slots + (i * KGp + kg) * 16, w);
        sum[i] = dpbusd(sum[i], ones, w);
      }
    }
    __m512i corr[4];
    for (int i = 0; i < 4; ++i) {
      for (int64_t kg = KG; kg < KGp; ++kg) _mm512_store_si512(slots + (i * KGp + kg) * 16, _mm512_setzero_si512());
      corr[i] = _mm512_slli_epi32(sum[i], 7);
    }
    const int64_t rows = m1 - m0;
    amx_pair(xu_buffer.data, ldu, m0, rows, slots, slots + KGp * 16, corr[0], corr[1], p, P + p, mask, mask, out);
    amx_pair(xu_buffer.data, ldu, m0, rows, slots + 2 * KGp * 16, slots + 3 * KGp * 16, corr[2], corr[3], 2 * P + p,
             3 * P + p, mask, mask, out);
  }
  _tile_release();
}

void int8_gemm_amx(const int8_t* x_q, int64_t lda, int64_t K, int64_t m0, int64_t m1, const int8_t* w, int64_t n0,
                   int64_t n1, const OutputSpec& out) {
  if (m1 - m0 <= kDecodeMaxRows) return int8_gemm(x_q, lda, K, m0, m1, w, n0, n1, out);
  const int64_t KG = (K + 3) / 4, KGp = (KG + 15) / 16 * 16, ldu = KGp * 4;
  AlignedBuffer xu_buffer(size_t((m1 - m0 + 31) / 32 * 32) * size_t(ldu));
  fill_unsigned_activations(x_q, lda, K, m0, m1, ldu, xu_buffer.data);
  AlignedBuffer tile_buffer(size_t(KGp) * 64 * 2);
  uint32_t* tiles = reinterpret_cast<uint32_t*>(tile_buffer.data);
  configure_tiles();
  for (int64_t n = n0; n < n1; n += 32) {
    __m512i corr[2];
    __mmask16 mask[2];
    for (int j = 0; j < 2; ++j) {
      const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(16, n1 - n - 16 * j));
      uint32_t* tile = tiles + j * KGp * 16;
      fill_dword_tile(reinterpret_cast<const uint8_t*>(w + std::min(n + 16 * j, n1) * K), K, rows, KG, 16, tile);
      for (int64_t kg = KG; kg < KGp; ++kg) _mm512_store_si512(tile + kg * 16, _mm512_setzero_si512());
      corr[j] = unsigned_correction(tile, KGp);
      mask[j] = rows > 0 ? tail_mask16(rows) : __mmask16(0);
    }
    amx_pair(xu_buffer.data, ldu, m0, m1 - m0, tiles, tiles + KGp * 16, corr[0], corr[1], n, n + 16, mask[0], mask[1],
             out);
  }
  _tile_release();
}

}  // namespace

const KernelTable* avx512_kernels() {
  static const KernelTable table{"avx512", quantize_rows, ternary_gemm, int8_gemm, pack_rows_scalar,
                                 attention_scores, attention_values};
  return &table;
}

const KernelTable* amx_kernels() {
  static const KernelTable table{"amx", quantize_rows, ternary_gemm_amx, int8_gemm_amx, pack_rows_scalar,
                                 attention_scores, attention_values};
  return &table;
}

}  // namespace bitnet_cpu

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

#else  // not x86-64

namespace bitnet_cpu {
const KernelTable* avx512_kernels() { return nullptr; }
const KernelTable* amx_kernels() { return nullptr; }
}  // namespace bitnet_cpu

#endif
