// bitnet CPU kernels: AVX2 (+ FMA-free float math, F16C) implementation for CPUs without AVX-512 VNNI.
//
// Compiled for AVX2 through a target pragma (never through -march); isa.cpp only hands out this table when
// cpuid reports avx2 and f16c and the OS saves ymm state.
//
// Layout and numeric contract: kernel_api.h. Without vpdpbusd the products go through vpmaddubsw
// (unsigned x signed bytes -> saturating int16 pairs) and vpmaddwd against ones (-> int32):
//   * ternary: the unsigned operand is the code (w + 1) of one slot, isolated with a shift and a mask
//     (values 0..3), the signed one the int8 activation; a pair sums to at most 2 * 3 * 128 = 768, far from
//     int16 saturation. Subtracting sum_k x_k turns codes into ternary values.
//   * int8 (lm_head): the unsigned operand is |w| and the signed one x * sign(w) (vpsignb). The activation
//     codes of int8_linear come from the quantizer and lie in [-127, 127], so x * sign(w) never overflows and
//     a pair sums to at most 2 * 128 * 127 = 32512 (no saturation).
//   * decode streams each packed row from memory once for all its tokens (later pairs of tokens re-read it
//     from L1); prefill transposes a tile of 8 packed rows into dwords [K/4][8] once and reuses it for every
//     token (2 tokens x 4 slots per micro-kernel step).
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
#pragma clang attribute push(__attribute__((target("avx2,f16c,bmi,bmi2"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC diagnostic push
// GCC's intrinsic headers trip these on _mm512_undefined_*() placeholders.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx2,f16c,bmi,bmi2")
#endif
#include <immintrin.h>

namespace bitnet_cpu {
namespace {

struct AlignedBuffer {
  explicit AlignedBuffer(size_t bytes) : data(static_cast<uint8_t*>(::operator new(bytes + 64, std::align_val_t(64)))) {}
  ~AlignedBuffer() { ::operator delete(data, std::align_val_t(64)); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  uint8_t* data;
};

inline int32_t hsum8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// ---------------------------------------------------------------------------------------------- quantize

template <FloatKind KIND>
inline __m256 load8(const void* base, int64_t i) {
  if constexpr (KIND == FloatKind::BF16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else if constexpr (KIND == FloatKind::F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i)));
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  }
}

//! |v| as int32 bit patterns: for magnitudes (and NaN, which sorts above +inf) the integer order is the float
//! order, so an integer max propagates NaN where max_ps would drop it (scalar_common.h magnitude_max).
inline __m256i magnitude_bits(__m256 v) {
  return _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7FFFFFFF));
}

template <FloatKind KIND>
int32_t quantize_row(const void* x, int64_t K, int8_t* q, float* scale) {
  __m256i vmax0 = _mm256_setzero_si256(), vmax1 = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    vmax0 = _mm256_max_epi32(vmax0, magnitude_bits(load8<KIND>(x, k)));
    vmax1 = _mm256_max_epi32(vmax1, magnitude_bits(load8<KIND>(x, k + 8)));
  }
  for (; k + 8 <= K; k += 8) vmax0 = _mm256_max_epi32(vmax0, magnitude_bits(load8<KIND>(x, k)));
  const __m256i vmax = _mm256_max_epi32(vmax0, vmax1);
  __m128i m4 = _mm_max_epi32(_mm256_castsi256_si128(vmax), _mm256_extracti128_si256(vmax, 1));
  m4 = _mm_max_epi32(m4, _mm_shuffle_epi32(m4, 0x4E));
  m4 = _mm_max_epi32(m4, _mm_shuffle_epi32(m4, 0xB1));
  float absmax = bits_float(uint32_t(_mm_cvtsi128_si32(m4)));
  for (; k < K; ++k) absmax = magnitude_max(absmax, std::fabs(load_float(x, KIND, k)));
  if (nonfinite_absmax(absmax)) return quantize_nonfinite_row(K, q, absmax, scale);
  const float inv_s = activation_inverse_scale(absmax);
  const __m256 inv = _mm256_set1_ps(inv_s);
  const __m256 lo = _mm256_set1_ps(kActQmin), hi = _mm256_set1_ps(kActQmax);
  __m256i sum = _mm256_setzero_si256();
  for (k = 0; k + 8 <= K; k += 8) {
    const __m256 c = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(load8<KIND>(x, k), inv), lo), hi);
    const __m256i i32 = _mm256_cvtps_epi32(_mm256_round_ps(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    sum = _mm256_add_epi32(sum, i32);
    const __m128i s16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(s16, s16));
  }
  int32_t total = hsum8(sum);
  for (; k < K; ++k) {
    const int8_t c = quantize_code(load_float(x, KIND, k) * inv_s);
    q[k] = c;
    total += c;
  }
  *scale = activation_scale(absmax);
  return total;
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

//! Store n <= 8 int32 accumulators of row m, columns [col, col + n), through the fused epilogue.
inline void store8(const OutputSpec& o, int64_t m, int64_t col, __m256i acc, int64_t n) {
  if (n < 8) {
    alignas(32) int32_t v[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(v), acc);
    for (int64_t j = 0; j < n; ++j) store_output(o, m, col + j, v[j]);
    return;
  }
  const int64_t i = m * o.ldo + col;
  if (o.out_int32) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<int32_t*>(o.out) + i), acc);
    return;
  }
  const __m256 s = o.w_scale_per_col ? _mm256_mul_ps(_mm256_set1_ps(o.x_scale[m]), _mm256_loadu_ps(o.w_scale + col))
                                     : _mm256_set1_ps(o.x_scale[m] * o.w_scale[0]);
  __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), s);
  if (o.bias != nullptr) y = _mm256_add_ps(y, _mm256_loadu_ps(o.bias + col));
  switch (o.out_kind) {
    case FloatKind::BF16: {
      const __m256i u = _mm256_castps_si256(y);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
      r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(y, y, _CMP_UNORD_Q)));
      const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(o.out) + i), packed);
      break;
    }
    case FloatKind::F16:
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(o.out) + i),
                       _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
    default: _mm256_storeu_ps(static_cast<float*>(o.out) + i, y);
  }
}

// ---------------------------------------------------------------------------------------------- ternary

//! Blocks (32 bytes of a packed row, or dword groups of a tile) whose vpmaddubsw results are summed in int16
//! before they are widened: a pair is code * x + code' * x' with codes of two bits (<= 3) and |x| <= 128, at
//! most 768 in magnitude, so 32 of them stay below 2^15 - 1 (exact, no wrap-around) even for a code 3 that no
//! valid ternary weight has.
constexpr int64_t kInt16Steps = 32;

//! Decode of MT <= 2 tokens (rows m0, m0 + 1) against packed row p. ahead (or null): the row this thread
//! streams next, whose columns [ahead_k0, ahead_k1) are prefetched into L2 at the offset read now (prefetch.h).
template <int MT>
inline void ternary_decode_row(const int8_t* x_q, int64_t lda, const int32_t* x_sum, int64_t K, int64_t m0,
                               const uint8_t* packed, int64_t P, int64_t p, const char* ahead, int64_t ahead_k0,
                               int64_t ahead_k1, const OutputSpec& out) {
  const __m256i low2 = _mm256_set1_epi8(0x03), ones16 = _mm256_set1_epi16(1);
  const int64_t K32 = K / 32 * 32;
  const uint8_t* row = packed + p * K;
  __m256i acc[MT][4];
  for (int t = 0; t < MT; ++t)
    for (int i = 0; i < 4; ++i) acc[t][i] = _mm256_setzero_si256();
  for (int64_t kb = 0; kb < K32; kb += 32 * kInt16Steps) {
    // vpmaddubsw's int16 pairs summed in int16 for up to kInt16Steps blocks, then widened once (vpmaddwd):
    // 2 instead of 3 instructions per slot and token.
    __m256i acc16[MT][4];
    for (int t = 0; t < MT; ++t)
      for (int i = 0; i < 4; ++i) acc16[t][i] = _mm256_setzero_si256();
    const int64_t kend = std::min(K32, kb + 32 * kInt16Steps);
    for (int64_t k = kb; k < kend; k += 32) {
      if (ahead != nullptr && k % 64 == 0 && k >= ahead_k0 && k < ahead_k1) _mm_prefetch(ahead + k, _MM_HINT_T1);
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
      __m256i c[4];
      c[0] = _mm256_and_si256(b, low2);
      c[1] = _mm256_and_si256(_mm256_srli_epi16(b, 2), low2);
      c[2] = _mm256_and_si256(_mm256_srli_epi16(b, 4), low2);
      c[3] = _mm256_and_si256(_mm256_srli_epi16(b, 6), low2);
      for (int t = 0; t < MT; ++t) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_q + (m0 + t) * lda + k));
        for (int i = 0; i < 4; ++i) acc16[t][i] = _mm256_add_epi16(acc16[t][i], _mm256_maddubs_epi16(c[i], xv));
      }
    }
    for (int t = 0; t < MT; ++t)
      for (int i = 0; i < 4; ++i) acc[t][i] = _mm256_add_epi32(acc[t][i], _mm256_madd_epi16(acc16[t][i], ones16));
  }
  for (int t = 0; t < MT; ++t) {
    const int8_t* x = x_q + (m0 + t) * lda;
    int32_t s[4];
    for (int i = 0; i < 4; ++i) s[i] = hsum8(acc[t][i]);
    for (int64_t k = K32; k < K; ++k) {
      const int32_t b = row[k], v = x[k];
      for (int i = 0; i < 4; ++i) s[i] += ((b >> (2 * i)) & 3) * v;
    }
    for (int i = 0; i < 4; ++i) store_output(out, m0 + t, i * P + p, s[i] - x_sum[m0 + t]);
  }
}

//! Decode of the tokens [m0, m1) (at most kDecodeMaxRows) against packed rows [p0, p1): each row is streamed
//! from memory once, by the first pair of tokens, and re-read from L1 by the other pairs right away (each pair
//! prefetching its share of the next row's columns, so prefetches are issued all the time), so the weights
//! cross the memory bus once whatever the batch (with the pairs outside the rows, a batch of 8 streamed every
//! weight four times).
void ternary_decode(const int8_t* x_q, int64_t lda, const int32_t* x_sum, int64_t K, int64_t m0, int64_t m1,
                    const uint8_t* packed, int64_t P, int64_t p0, int64_t p1, const OutputSpec& out) {
  const int64_t pairs = (m1 - m0 + 1) / 2;
  for (int64_t p = p0; p < p1; ++p) {
    const char* ahead = reinterpret_cast<const char*>(rows_ahead(packed, p + 1, 1, p1, K));
    for (int64_t j = 0; j < pairs; ++j) {
      const int64_t m = m0 + 2 * j;
      const int64_t k0 = prefetch_share_begin(K, j, pairs), k1 = prefetch_share_begin(K, j + 1, pairs);
      if (m + 2 <= m1) ternary_decode_row<2>(x_q, lda, x_sum, K, m, packed, P, p, ahead, k0, k1, out);
      else ternary_decode_row<1>(x_q, lda, x_sum, K, m, packed, P, p, ahead, k0, k1, out);
    }
  }
}

//! Transpose byte rows [0, np) (row stride K) into dwords tile[kg * 8 + j] (zero padded), j < 8.
inline void fill_dword_tile8(const uint8_t* rows, int64_t K, int64_t np, int64_t KG, uint32_t* tile) {
  for (int64_t kg = 0; kg < KG; ++kg)
    for (int64_t j = 0; j < 8; ++j) {
      uint32_t v = 0;
      if (j < np) {
        if (kg * 4 + 4 <= K) {
          std::memcpy(&v, rows + j * K + kg * 4, 4);
        } else {
          uint8_t bytes[4] = {0, 0, 0, 0};
          for (int64_t t = 0; kg * 4 + t < K; ++t) bytes[t] = rows[j * K + kg * 4 + t];
          std::memcpy(&v, bytes, 4);
        }
      }
      tile[kg * 8 + j] = v;
    }
}

template <int MR>
inline void ternary_micro(const int8_t* x, int64_t lda, const uint32_t* tile, int64_t KG, const int32_t* x_sum,
                          int64_t m, int64_t P, int64_t p, int64_t np, const OutputSpec& out) {
  const __m256i low2 = _mm256_set1_epi8(0x03), ones16 = _mm256_set1_epi16(1);
  __m256i acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_setzero_si256();
  for (int64_t kb = 0; kb < KG; kb += kInt16Steps) {
    __m256i acc16[MR][4];  // int16 sums of vpmaddubsw pairs, widened every kInt16Steps dword groups
    for (int r = 0; r < MR; ++r)
      for (int i = 0; i < 4; ++i) acc16[r][i] = _mm256_setzero_si256();
    const int64_t kend = std::min(KG, kb + kInt16Steps);
    for (int64_t kg = kb; kg < kend; ++kg) {
      const __m256i b = _mm256_load_si256(reinterpret_cast<const __m256i*>(tile + kg * 8));
      __m256i c[4];
      c[0] = _mm256_and_si256(b, low2);
      c[1] = _mm256_and_si256(_mm256_srli_epi32(b, 2), low2);
      c[2] = _mm256_and_si256(_mm256_srli_epi32(b, 4), low2);
      c[3] = _mm256_and_si256(_mm256_srli_epi32(b, 6), low2);
      for (int r = 0; r < MR; ++r) {
        int32_t a32;
        std::memcpy(&a32, x + r * lda + kg * 4, 4);
        const __m256i a = _mm256_set1_epi32(a32);
        for (int i = 0; i < 4; ++i) acc16[r][i] = _mm256_add_epi16(acc16[r][i], _mm256_maddubs_epi16(c[i], a));
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_add_epi32(acc[r][i], _mm256_madd_epi16(acc16[r][i], ones16));
  }
  for (int r = 0; r < MR; ++r) {
    const __m256i corr = _mm256_set1_epi32(x_sum[m + r]);
    for (int i = 0; i < 4; ++i) store8(out, m + r, i * P + p, _mm256_sub_epi32(acc[r][i], corr), np);
  }
}

void ternary_gemm(const int8_t* x_q, int64_t lda, const int32_t* x_sum, int64_t K, int64_t m0, int64_t m1,
                  const uint8_t* packed, int64_t P, int64_t p0, int64_t p1, const OutputSpec& out) {
  if (m1 - m0 <= kDecodeMaxRows) {
    ternary_decode(x_q, lda, x_sum, K, m0, m1, packed, P, p0, p1, out);
    return;
  }
  const int64_t KG = (K + 3) / 4;
  AlignedBuffer tile_buffer(size_t(KG) * 32);
  uint32_t* tile = reinterpret_cast<uint32_t*>(tile_buffer.data);
  for (int64_t p = p0; p < p1; p += 8) {
    const int64_t np = std::min<int64_t>(8, p1 - p);
    fill_dword_tile8(packed + p * K, K, np, KG, tile);
    int64_t m = m0;
    for (; m + 2 <= m1; m += 2) ternary_micro<2>(x_q + m * lda, lda, tile, KG, x_sum, m, P, p, np, out);
    if (m < m1) ternary_micro<1>(x_q + m * lda, lda, tile, KG, x_sum, m, P, p, np, out);
  }
}

// ---------------------------------------------------------------------------------------------- int8

//! next_rows (or null): the NR rows this thread streams next, prefetched into L2 at the offset read now.
template <int MT, int NR>
inline void int8_decode_rows(const int8_t* x_q, int64_t lda, int64_t K, int64_t m0, const int8_t* w, int64_t n,
                             const OutputSpec& out, const int8_t* next_rows, int64_t ahead_k0, int64_t ahead_k1) {
  const __m256i ones16 = _mm256_set1_epi16(1);
  const char* ahead = reinterpret_cast<const char*>(next_rows);
  const int64_t K32 = K / 32 * 32;
  __m256i acc[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < MT; ++t) acc[r][t] = _mm256_setzero_si256();
  for (int64_t k = 0; k < K32; k += 32) {
    __m256i xv[MT];
    for (int t = 0; t < MT; ++t) xv[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_q + (m0 + t) * lda + k));
    if (ahead != nullptr && k % 64 == 0 && k >= ahead_k0 && k < ahead_k1)
      for (int r = 0; r < NR; ++r) _mm_prefetch(ahead + r * K + k, _MM_HINT_T1);
    for (int r = 0; r < NR; ++r) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n + r) * K + k));
      const __m256i wa = _mm256_abs_epi8(wv);
      for (int t = 0; t < MT; ++t)
        acc[r][t] = _mm256_add_epi32(
            acc[r][t], _mm256_madd_epi16(_mm256_maddubs_epi16(wa, _mm256_sign_epi8(xv[t], wv)), ones16));
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < MT; ++t) {
      int32_t s = hsum8(acc[r][t]);
      const int8_t* x = x_q + (m0 + t) * lda;
      const int8_t* row = w + (n + r) * K;
      for (int64_t k = K32; k < K; ++k) s += int32_t(x[k]) * int32_t(row[k]);
      store_output(out, m0 + t, n + r, s);
    }
}

//! Decode of the tokens [m0, m1) (at most kDecodeMaxRows) against weight rows [n0, n1), two rows at a time:
//! each pair of rows is streamed once by the first pair of tokens and re-read from L1 by the other token pairs
//! right away (each token pair prefetching its share of the next rows' columns).
void int8_decode(const int8_t* x_q, int64_t lda, int64_t K, int64_t m0, int64_t m1, const int8_t* w, int64_t n0,
                 int64_t n1, const OutputSpec& out) {
  const int64_t pairs = (m1 - m0 + 1) / 2;
  for (int64_t n = n0; n < n1;) {
    const int nr = n + 2 <= n1 ? 2 : 1;
    const int8_t* ahead = rows_ahead(w, n + nr, nr, n1, K);
    for (int64_t j = 0; j < pairs; ++j) {
      const int64_t m = m0 + 2 * j;
      const int64_t k0 = prefetch_share_begin(K, j, pairs), k1 = prefetch_share_begin(K, j + 1, pairs);
      if (m + 2 <= m1) {
        if (nr == 2) int8_decode_rows<2, 2>(x_q, lda, K, m, w, n, out, ahead, k0, k1);
        else int8_decode_rows<2, 1>(x_q, lda, K, m, w, n, out, ahead, k0, k1);
      } else {
        if (nr == 2) int8_decode_rows<1, 2>(x_q, lda, K, m, w, n, out, ahead, k0, k1);
        else int8_decode_rows<1, 1>(x_q, lda, K, m, w, n, out, ahead, k0, k1);
      }
    }
    n += nr;
  }
}

template <int MR>
inline void int8_micro(const int8_t* x, int64_t lda, const uint32_t* tile, int64_t KG, int64_t m, int64_t n,
                       int64_t nn, const OutputSpec& out) {
  const __m256i ones16 = _mm256_set1_epi16(1);
  __m256i acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t kg = 0; kg < KG; ++kg) {
    __m256i b[2], ba[2];
    for (int v = 0; v < 2; ++v) {
      b[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(tile + kg * 16 + v * 8));
      ba[v] = _mm256_abs_epi8(b[v]);
    }
    for (int r = 0; r < MR; ++r) {
      int32_t a32;
      std::memcpy(&a32, x + r * lda + kg * 4, 4);
      const __m256i a = _mm256_set1_epi32(a32);
      for (int v = 0; v < 2; ++v)
        acc[r][v] = _mm256_add_epi32(
            acc[r][v], _mm256_madd_epi16(_mm256_maddubs_epi16(ba[v], _mm256_sign_epi8(a, b[v])), ones16));
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 2; ++v) {
      const int64_t left = nn - v * 8;
      if (left <= 0) break;
      store8(out, m + r, n + v * 8, acc[r][v], std::min<int64_t>(8, left));
    }
}

void int8_gemm(const int8_t* x_q, int64_t lda, int64_t K, int64_t m0, int64_t m1, const int8_t* w, int64_t n0,
               int64_t n1, const OutputSpec& out) {
  if (m1 - m0 <= kDecodeMaxRows) {
    int8_decode(x_q, lda, K, m0, m1, w, n0, n1, out);
    return;
  }
  const int64_t KG = (K + 3) / 4;
  AlignedBuffer tile_buffer(size_t(KG) * 64);
  uint32_t* tile = reinterpret_cast<uint32_t*>(tile_buffer.data);
  for (int64_t n = n0; n < n1; n += 16) {
    const int64_t nn = std::min<int64_t>(16, n1 - n);
    for (int v = 0; v < 2; ++v) {
      const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(8, nn - v * 8));
      // Interleave the two 8-row halves: tile[kg][v][8].
      for (int64_t kg = 0; kg < KG; ++kg)
        for (int64_t j = 0; j < 8; ++j) {
          uint8_t bytes[4] = {0, 0, 0, 0};
          if (j < rows)
            for (int64_t t = 0; t < 4 && kg * 4 + t < K; ++t) bytes[t] = uint8_t(w[(n + v * 8 + j) * K + kg * 4 + t]);
          std::memcpy(tile + kg * 16 + v * 8 + j, bytes, 4);
        }
    }
    int64_t m = m0;
    for (; m + 2 <= m1; m += 2) int8_micro<2>(x_q + m * lda, lda, tile, KG, m, n, nn, out);
    if (m < m1) int8_micro<1>(x_q + m * lda, lda, tile, KG, m, n, nn, out);
  }
}

}  // namespace

const KernelTable* avx2_kernels() {
  static const KernelTable table{"avx2", quantize_rows, ternary_gemm, int8_gemm, pack_rows_scalar};
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
const KernelTable* avx2_kernels() { return nullptr; }
}  // namespace bitnet_cpu

#endif
