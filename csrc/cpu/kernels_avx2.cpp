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
//     from L1); prefill unpacks a tile of 16 packed rows into codes [slot][K/4][16 rows x 4 bytes] once and
//     reuses it for every token (4 tokens x 16 rows of one slot per micro-kernel step).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
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

#include "attention_simd.h"

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

//! How far ahead the decode loops prefetch, in bytes of weight rows (whole rows, at least one): one row of a
//! 2B-4T shape (2560 bytes) kept too few lines in flight for one core. Measured with forced AVX2 on Zen 5,
//! weights streamed from memory: the ternary 6912 x 2560 weight at 1 thread went from 24 to 28 GB/s with two rows
//! ahead (2 threads: 33-37 to 37-45 GB/s), and the int8 lm_head from 28 to 34 GB/s at 1 thread with four (2
//! threads: 44-47 to 44-51 GB/s; six rows lost at 2 threads).
constexpr int64_t kTernaryAheadBytes = 5120;
constexpr int64_t kInt8AheadBytes = 10240;

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
  const int64_t ahead_rows = prefetch_rows_ahead(K, kTernaryAheadBytes);
  for (int64_t p = p0; p < p1; ++p) {
    const char* ahead = reinterpret_cast<const char*>(rows_ahead(packed, p + ahead_rows, 1, p1, K));
    for (int64_t j = 0; j < pairs; ++j) {
      const int64_t m = m0 + 2 * j;
      const int64_t k0 = prefetch_share_begin(K, j, pairs), k1 = prefetch_share_begin(K, j + 1, pairs);
      if (m + 2 <= m1) ternary_decode_row<2>(x_q, lda, x_sum, K, m, packed, P, p, ahead, k0, k1, out);
      else ternary_decode_row<1>(x_q, lda, x_sum, K, m, packed, P, p, ahead, k0, k1, out);
    }
  }
}

//! This thread's scratch for unpacked codes (grown on demand, never shrunk): a prefill fills one per call, and a
//! fresh allocation of up to 64 * K bytes each time would be page-faulted in again.
inline uint8_t* code_buffer(size_t bytes) {
  thread_local std::unique_ptr<AlignedBuffer> buffer;
  thread_local size_t capacity = 0;
  if (capacity < bytes) {
    buffer.reset();
    buffer = std::make_unique<AlignedBuffer>(bytes);
    capacity = bytes;
  }
  return buffer->data;
}

//! s0 += vpmaddubsw(c0, a), s1 += vpmaddubsw(c1, a) for a = the 4 bytes at x broadcast to every dword. With GCC
//! and Clang the step is written in assembly: GCC computed each product into a fresh register and copied the sum
//! back, which needs one register more than the 16 ymm; the spilled accumulator's store-to-load chain then bounded
//! the prefill loop at ~4.2 G vpmaddubsw/s (6.1 with this step; 6.7 is the core's rate for vpmaddubsw + vpaddw).
inline void madd_pair_step(const int8_t* x, __m256i c0, __m256i c1, __m256i& s0, __m256i& s1) {
#if defined(__GNUC__)
  __m256i a, p0, p1;
  __asm__("vpbroadcastd %[x], %[a]\n\t"
          "vpmaddubsw %[a], %[c0], %[p0]\n\t"
          "vpmaddubsw %[a], %[c1], %[p1]\n\t"
          "vpaddw %[p0], %[s0], %[s0]\n\t"
          "vpaddw %[p1], %[s1], %[s1]"
          : [s0] "+x"(s0), [s1] "+x"(s1), [a] "=&x"(a), [p0] "=&x"(p0), [p1] "=&x"(p1)
          : [x] "m"(*reinterpret_cast<const int32_t*>(x)), [c0] "x"(c0), [c1] "x"(c1));
#else
  int32_t a32;
  std::memcpy(&a32, x, 4);
  const __m256i a = _mm256_set1_epi32(a32);
  s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(c0, a));
  s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(c1, a));
#endif
}

//! Unpack packed rows [0, np) (np <= 8, row stride K) into half v (0 or 1) of the 16-row code tile of a prefill:
//! codes[((i * KG + kg) * 2 + v) * 32 + 4 j + b] is the two-bit code of slot i of row 8 v + j at k = 4 kg + b,
//! one per byte (zero padded beyond np and K).
//! The codes are unpacked once per tile and read by every token of the row block, so the micro-kernel spends
//! no instructions on shifts and masks (2 per slot and 4 columns before; with 2 tokens per step they were a
//! third of its instructions, and the 16 accumulators it then needed spilled).
//! ahead (or null): the 8 rows that take this place in the next tile, prefetched into L2 line by line at the
//! offset read now (the weights reach the prefill through this fill).
inline void fill_code_tile8(const uint8_t* rows, int64_t K, int64_t np, int64_t KG, uint8_t* codes, int v,
                            const uint8_t* ahead) {
  const __m256i low2 = _mm256_set1_epi8(0x03);
  auto unpack = [&](int64_t kg, __m256i dwords) {
    for (int i = 0; i < 4; ++i)
      _mm256_store_si256(reinterpret_cast<__m256i*>(codes + ((i * KG + kg) * 2 + v) * 32),
                         _mm256_and_si256(_mm256_srli_epi32(dwords, 2 * i), low2));
  };
  int64_t kg = 0;
  if (np == 8) {
    // 8 dword groups of all 8 rows at a time: an 8 x 8 dword transpose.
    for (; kg * 4 + 32 <= K; kg += 8) {
      if (ahead != nullptr && kg % 16 == 0)
        for (int j = 0; j < 8; ++j) _mm_prefetch(reinterpret_cast<const char*>(ahead + j * K + kg * 4), _MM_HINT_T1);
      __m256i r[8], t[8], u[8];
      for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + j * K + kg * 4));
      for (int j = 0; j < 8; j += 2) {
        t[j] = _mm256_unpacklo_epi32(r[j], r[j + 1]);
        t[j + 1] = _mm256_unpackhi_epi32(r[j], r[j + 1]);
      }
      for (int h = 0; h < 8; h += 4) {
        u[h + 0] = _mm256_unpacklo_epi64(t[h], t[h + 2]);
        u[h + 1] = _mm256_unpackhi_epi64(t[h], t[h + 2]);
        u[h + 2] = _mm256_unpacklo_epi64(t[h + 1], t[h + 3]);
        u[h + 3] = _mm256_unpackhi_epi64(t[h + 1], t[h + 3]);
      }
      for (int d = 0; d < 4; ++d) {
        unpack(kg + d, _mm256_permute2x128_si256(u[d], u[d + 4], 0x20));
        unpack(kg + d + 4, _mm256_permute2x128_si256(u[d], u[d + 4], 0x31));
      }
    }
  }
  for (; kg < KG; ++kg) {
    alignas(32) uint32_t v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t j = 0; j < np; ++j) {
      if (kg * 4 + 4 <= K) {
        std::memcpy(&v[j], rows + j * K + kg * 4, 4);
      } else {
        uint8_t bytes[4] = {0, 0, 0, 0};
        for (int64_t b = 0; kg * 4 + b < K; ++b) bytes[b] = rows[j * K + kg * 4 + b];
        std::memcpy(&v[j], bytes, 4);
      }
    }
    unpack(kg, _mm256_load_si256(reinterpret_cast<const __m256i*>(v)));
  }
}

//! Prefill micro-kernel: MT <= 4 tokens (rows m .. m + MT - 1 of x) against the code tile of 16 packed rows, one
//! slot at a time. Per dword group and slot: two loads of codes, one broadcast of each token's 4 bytes, and per
//! token and half one vpmaddubsw and one int16 add, the 2 instructions per 32 multiply-adds the int16 route needs
//! at least. 8 accumulators, 2 code and 4 activation registers fit the 16 ymm registers: with 8 tokens x 8 rows
//! one accumulator spilled and its store-to-load chain bounded the loop at ~4 G vpmaddubsw/s.
template <int MT>
inline void ternary_micro(const int8_t* x, int64_t lda, const uint8_t* codes, int64_t KG, const int32_t* x_sum,
                          int64_t m, int64_t P, int64_t p, int64_t np, const OutputSpec& out) {
  const __m256i ones16 = _mm256_set1_epi16(1);
  for (int i = 0; i < 4; ++i) {
    const uint8_t* slot = codes + i * KG * 64;
    __m256i acc[MT][2];
    for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_si256();
    for (int64_t kb = 0; kb < KG; kb += kInt16Steps) {
      // int16 sums of vpmaddubsw pairs (token t, half v: s<t><v>), widened every kInt16Steps dword groups. Named
      // locals, not an array: GCC kept an array whose elements the step takes by reference on the stack.
      __m256i s00 = _mm256_setzero_si256(), s01 = s00, s10 = s00, s11 = s00, s20 = s00, s21 = s00, s30 = s00,
              s31 = s00;
      const int64_t kend = std::min(KG, kb + kInt16Steps);
      for (int64_t kg = kb; kg < kend; ++kg) {
        const __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(slot + kg * 64));
        const __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(slot + kg * 64 + 32));
        const int8_t* xk = x + kg * 4;
        madd_pair_step(xk, c0, c1, s00, s01);
        if constexpr (MT > 1) madd_pair_step(xk + lda, c0, c1, s10, s11);
        if constexpr (MT > 2) madd_pair_step(xk + 2 * lda, c0, c1, s20, s21);
        if constexpr (MT > 3) madd_pair_step(xk + 3 * lda, c0, c1, s30, s31);
      }
      const __m256i sums[4][2] = {{s00, s01}, {s10, s11}, {s20, s21}, {s30, s31}};
      for (int t = 0; t < MT; ++t)
        for (int v = 0; v < 2; ++v) acc[t][v] = _mm256_add_epi32(acc[t][v], _mm256_madd_epi16(sums[t][v], ones16));
    }
    for (int t = 0; t < MT; ++t) {
      const __m256i corr = _mm256_set1_epi32(x_sum[m + t]);
      for (int v = 0; v < 2 && v * 8 < np; ++v)
        store8(out, m + t, i * P + p + v * 8, _mm256_sub_epi32(acc[t][v], corr), std::min<int64_t>(8, np - v * 8));
    }
  }
}

void ternary_gemm(const int8_t* x_q, int64_t lda, const int32_t* x_sum, int64_t K, int64_t m0, int64_t m1,
                  const uint8_t* packed, int64_t P, int64_t p0, int64_t p1, const OutputSpec& out) {
  if (m1 - m0 <= kDecodeMaxRows) {
    ternary_decode(x_q, lda, x_sum, K, m0, m1, packed, P, p0, p1, out);
    return;
  }
  const int64_t KG = (K + 3) / 4;
  uint8_t* codes = code_buffer(size_t(KG) * 256);
  for (int64_t p = p0; p < p1; p += 16) {
    const int64_t np = std::min<int64_t>(16, p1 - p);
    const uint8_t* next = rows_ahead(packed, p + 16, 16, p1, K);
    for (int v = 0; v < 2; ++v)
      fill_code_tile8(packed + (p + 8 * v) * K, K, std::max<int64_t>(0, std::min<int64_t>(8, np - 8 * v)), KG, codes, v,
                      next == nullptr ? nullptr : next + 8 * v * K);
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) ternary_micro<4>(x_q + m * lda, lda, codes, KG, x_sum, m, P, p, np, out);
    const int64_t left = m1 - m;
    if (left == 3) ternary_micro<3>(x_q + m * lda, lda, codes, KG, x_sum, m, P, p, np, out);
    else if (left == 2) ternary_micro<2>(x_q + m * lda, lda, codes, KG, x_sum, m, P, p, np, out);
    else if (left == 1) ternary_micro<1>(x_q + m * lda, lda, codes, KG, x_sum, m, P, p, np, out);
  }
}

// ---------------------------------------------------------------------------------------------- int8

//! Decode: MT <= 2 tokens against weight row n, streamed once. The columns are unrolled (U = 4 / MT blocks of
//! 32 per step, each with its own accumulator) so that enough loads are in flight. next_row (or null): the row
//! this thread streams next, whose columns [ahead_k0, ahead_k1) are prefetched into L2 at the offset read now.
//! One row per call: measured on the 2B-4T lm_head (128256 x 2560 int8, forced AVX2 on Zen 5, one row prefetched
//! ahead), two rows per call without unrolling streamed at 27 GB/s (1 thread) and 36 GB/s (2 threads), this
//! loop at 28 and 45-47 GB/s.
template <int MT>
inline void int8_decode_row(const int8_t* x_q, int64_t lda, int64_t K, int64_t m0, const int8_t* w, int64_t n,
                            const OutputSpec& out, const int8_t* next_row, int64_t ahead_k0, int64_t ahead_k1) {
  constexpr int U = MT == 1 ? 4 : 2;
  const __m256i ones16 = _mm256_set1_epi16(1);
  const char* ahead = reinterpret_cast<const char*>(next_row);
  const int8_t* row = w + n * K;
  const int8_t* x = x_q + m0 * lda;
  __m256i acc[MT][U];
  for (int t = 0; t < MT; ++t)
    for (int u = 0; u < U; ++u) acc[t][u] = _mm256_setzero_si256();
  auto block = [&](int64_t k, int u) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
    const __m256i wa = _mm256_abs_epi8(wv);
    for (int t = 0; t < MT; ++t) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + t * lda + k));
      acc[t][u] = _mm256_add_epi32(acc[t][u],
                                   _mm256_madd_epi16(_mm256_maddubs_epi16(wa, _mm256_sign_epi8(xv, wv)), ones16));
    }
  };
  auto prefetch = [&](int64_t k) {
    if (ahead != nullptr && k % 64 == 0 && k >= ahead_k0 && k < ahead_k1) _mm_prefetch(ahead + k, _MM_HINT_T1);
  };
  int64_t k = 0;
  for (; k + 32 * U <= K; k += 32 * U) {
    for (int u = 0; u < U; u += 2) prefetch(k + 32 * u);
    for (int u = 0; u < U; ++u) block(k + 32 * u, u);
  }
  for (; k + 32 <= K; k += 32) {
    prefetch(k);
    block(k, 0);
  }
  for (int t = 0; t < MT; ++t) {
    for (int u = 1; u < U; ++u) acc[t][0] = _mm256_add_epi32(acc[t][0], acc[t][u]);
    int32_t sum = hsum8(acc[t][0]);
    for (int64_t j = k; j < K; ++j) sum += int32_t(x[t * lda + j]) * int32_t(row[j]);
    store_output(out, m0 + t, n, sum);
  }
}

//! Decode of the tokens [m0, m1) (at most kDecodeMaxRows) against weight rows [n0, n1), one row at a time: each
//! row is streamed once by the first pair of tokens and re-read from L1 by the other token pairs right away (each
//! token pair prefetching its share of the next row's columns).
void int8_decode(const int8_t* x_q, int64_t lda, int64_t K, int64_t m0, int64_t m1, const int8_t* w, int64_t n0,
                 int64_t n1, const OutputSpec& out) {
  const int64_t pairs = (m1 - m0 + 1) / 2;
  const int64_t ahead_rows = prefetch_rows_ahead(K, kInt8AheadBytes);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* ahead = rows_ahead(w, n + ahead_rows, 1, n1, K);
    for (int64_t j = 0; j < pairs; ++j) {
      const int64_t m = m0 + 2 * j;
      const int64_t k0 = prefetch_share_begin(K, j, pairs), k1 = prefetch_share_begin(K, j + 1, pairs);
      if (m + 2 <= m1) int8_decode_row<2>(x_q, lda, K, m, w, n, out, ahead, k0, k1);
      else int8_decode_row<1>(x_q, lda, K, m, w, n, out, ahead, k0, k1);
    }
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

// ---------------------------------------------------------------------------------------------- attention
//
// The decode engine's attention loops (attention_simd.h) with 8-lane fp32 vectors, multiply then add (no fma: an
// AVX2 CPU need not have it), D a multiple of 16: 4 keys x 2 heads per scores pass, 4 heads x 16 columns of value
// sums. The sums run in another order than the portable loops' (which the scalar path keeps), so avx2 is its own
// family of bit-equal results. Measured, 2B-4T shape, 8 sequences, 1 thread, forced AVX2 on Zen 5: the attention
// of a step at position 512 took 44.9 ms with the portable loops, 40.0 ms with these.

//! The four fp32 sums of four 8-lane vectors, as the lanes of one __m128 (v0 in lane 0).
inline __m128 reduce4_ps(__m256 v0, __m256 v1, __m256 v2, __m256 v3) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

//! 8 cache values from column c of row j (bf16 widened) as fp32.
inline __m256 cache8(const void* rows, bool bf16, int64_t j, int64_t D, int64_t c) {
  if (bf16) {
    const uint16_t* at = static_cast<const uint16_t*>(rows) + j * D + c;
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(at));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  return _mm256_loadu_ps(static_cast<const float*>(rows) + j * D + c);
}

//! The shared attention loops (attention_simd.h) on 8 fp32 lanes, multiply then add.
struct Avx2Floats {
  using reg = __m256;
  static constexpr int64_t kLanes = 8;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static reg splat(float v) { return _mm256_set1_ps(v); }
  static reg madd(reg a, reg b, reg acc) { return _mm256_add_ps(acc, _mm256_mul_ps(a, b)); }
  static reg cache(const void* rows, bool bf16, int64_t j, int64_t D, int64_t c) { return cache8(rows, bf16, j, D, c); }
  static __m128 reduce4(reg v0, reg v1, reg v2, reg v3) { return reduce4_ps(v0, v1, v2, v3); }
};

//! 2 query heads per scores pass: 8 accumulators, 4 keys and the query vector fit the 16 ymm registers.
void attention_scores(const float* q, int64_t G, const void* keys, bool bf16, int64_t len, int64_t D, float scale,
                      float* scores) {
  simd_attention_scores<Avx2Floats, 2>(q, G, keys, bf16, len, D, scale, scores);
}

void attention_values(const float* p, int64_t G, const void* values, bool bf16, int64_t len, int64_t D, float* acc) {
  simd_attention_values<Avx2Floats>(p, G, values, bf16, len, D, acc);
}

}  // namespace

const KernelTable* avx2_kernels() {
  static const KernelTable table{"avx2", quantize_rows, ternary_gemm, int8_gemm, pack_rows_scalar,
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
const KernelTable* avx2_kernels() { return nullptr; }
}  // namespace bitnet_cpu

#endif
