// bitnet CPU kernels: the float GEMV of bitnet::float_linear (torch-free). See float_gemv.h.
//
// Each SIMD path is compiled inside its own target region (`#pragma GCC target`, or `#pragma clang attribute`
// with clang; never through -march), so the library loads on any x86-64 CPU; the path is picked at run
// time from cpuid + xgetbv.
//
// Blocking: R = 4 consecutive weight rows (one contiguous 4*K stretch of memory, four hardware-prefetch
// streams) times up to MB tokens, R*MB independent vector accumulators; tokens beyond MB reuse the same
// weight rows from L1. The K tail is handled with masked loads (AVX-512) or a scalar remainder (AVX2).
#include "float_gemv.h"
#include "prefetch.h"

#include <algorithm>
#include <atomic>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#define BITNET_GEMV_X86 1
#endif

namespace bitnet_cpu {
namespace {

//! Weight rows per block.
constexpr int kRows = 4;
//! What the first token block of row group [n, n + R) prefetches (prefetch.h): the byte address of the next
//! group's rows (row stride K * elem), or null when none of this thread's rows follows.
inline const char* next_row_group(const FloatGemvArgs& a, int64_t n, int R, int64_t n_end, int64_t elem) {
  return rows_ahead(static_cast<const char*>(a.w), n + R, R, n_end, a.K * elem);
}

inline float bf16_to_float(uint16_t bits) {
  const uint32_t wide = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

// --------------------------------------------------------------------------------------------- scalar

void scalar_rows(const FloatGemvArgs& a, int64_t n0, int64_t n1) {
  const int64_t K = a.K;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = a.x_f32 + m * K;
      float acc = 0.0f;
      if (a.w_bf16) {
        const uint16_t* w = static_cast<const uint16_t*>(a.w) + n * K;
        for (int64_t k = 0; k < K; ++k) acc += x[k] * bf16_to_float(w[k]);
      } else {
        const float* w = static_cast<const float*>(a.w) + n * K;
        for (int64_t k = 0; k < K; ++k) acc += x[k] * w[k];
      }
      a.out[m * a.ldo + n] = a.bias ? acc + a.bias[n] : acc;
    }
  }
}

#if defined(BITNET_GEMV_X86)

// --------------------------------------------------------------------------------------------- cpuid

struct GemvFeatures {
  bool avx2 = false;
  bool avx512 = false;
  bool avx512_bf16 = false;
};

GemvFeatures detect() {
  GemvFeatures f;
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return f;
  const bool osxsave = ecx & (1u << 27), avx = ecx & (1u << 28), fma = ecx & (1u << 12);
  if (!osxsave || !avx || !fma) return f;
  uint32_t xlo = 0, xhi = 0;
  __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
  const uint64_t xcr0 = (uint64_t(xhi) << 32) | xlo;
  if ((xcr0 & 0x6) != 0x6) return f;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return f;
  const unsigned max_subleaf = eax;
  f.avx2 = ebx & (1u << 5);
  const bool avx512f = ebx & (1u << 16), avx512bw = ebx & (1u << 30), avx512vl = ebx & (1u << 31);
  f.avx512 = f.avx2 && (xcr0 & 0xE6) == 0xE6 && avx512f && avx512bw && avx512vl;
  if (f.avx512 && max_subleaf >= 1 && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) f.avx512_bf16 = eax & (1u << 5);
  return f;
}

const GemvFeatures& features() {
  static const GemvFeatures f = detect();
  return f;
}

}  // namespace
}  // namespace bitnet_cpu

// --------------------------------------------------------------------------------------------- AVX2 + FMA

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace bitnet_cpu {
namespace {

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <bool WBF16>
inline __m256 avx2_load_w(const void* w, int64_t offset) {
  if constexpr (WBF16) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + offset));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(w) + offset);
  }
}

template <bool WBF16>
inline float scalar_w(const void* w, int64_t offset) {
  if constexpr (WBF16) return bf16_to_float(static_cast<const uint16_t*>(w)[offset]);
  return static_cast<const float*>(w)[offset];
}

//! Rows [n, n + R) x tokens [m0, m0 + MB).
template <bool WBF16, int R, int MB>
void avx2_block(const FloatGemvArgs& a, int64_t n, int64_t m0, const char* ahead) {
  const int64_t K = a.K;
  const int64_t elem = WBF16 ? 2 : 4;
  __m256 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) {
      if (ahead != nullptr && (k * elem) % 64 == 0) _mm_prefetch(ahead + (r * K + k) * elem, _MM_HINT_T1);
      wv[r] = avx2_load_w<WBF16>(a.w, (n + r) * K + k);
    }
    for (int m = 0; m < MB; ++m) {
      const __m256 xv = _mm256_loadu_ps(a.x_f32 + (m0 + m) * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(xv, wv[r], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      float sum = hsum256(acc[r][m]);
      const float* x = a.x_f32 + (m0 + m) * K;
      for (int64_t kk = k; kk < K; ++kk) sum += x[kk] * scalar_w<WBF16>(a.w, (n + r) * K + kk);
      a.out[(m0 + m) * a.ldo + n + r] = a.bias ? sum + a.bias[n + r] : sum;
    }
}

template <bool WBF16, int R>
void avx2_tokens(const FloatGemvArgs& a, int64_t n, const char* ahead) {
  constexpr int kTokens = 2;  // 16 ymm registers: 4 rows x 2 tokens accumulators + 4 weights + x
  for (int64_t m0 = 0; m0 < a.M; m0 += kTokens) {
    const char* prefetch = m0 == 0 ? ahead : nullptr;  // later token blocks re-read the rows from cache
    if (a.M - m0 >= 2) avx2_block<WBF16, R, 2>(a, n, m0, prefetch);
    else avx2_block<WBF16, R, 1>(a, n, m0, prefetch);
  }
}

template <bool WBF16>
void avx2_rows_typed(const FloatGemvArgs& a, int64_t n0, int64_t n1) {
  int64_t n = n0;
  const int64_t elem = WBF16 ? 2 : 4;
  for (; n + kRows <= n1; n += kRows) avx2_tokens<WBF16, kRows>(a, n, next_row_group(a, n, kRows, n1, elem));
  for (; n < n1; ++n) avx2_tokens<WBF16, 1>(a, n, next_row_group(a, n, 1, n1, elem));
}

void avx2_rows(const FloatGemvArgs& a, int64_t n0, int64_t n1) {
  if (a.w_bf16) avx2_rows_typed<true>(a, n0, n1);
  else avx2_rows_typed<false>(a, n0, n1);
}

}  // namespace
}  // namespace bitnet_cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// --------------------------------------------------------------------------------------------- AVX-512F

#pragma GCC diagnostic push
// GCC's intrinsic headers trip these on _mm512_undefined_*() placeholders (as in kernels_avx512.cpp).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
#endif

namespace bitnet_cpu {
namespace {

template <bool WBF16>
inline __m512 avx512_load_w(const void* w, int64_t offset, __mmask16 mask) {
  if constexpr (WBF16) {
    const __m256i raw = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(w) + offset);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  } else {
    return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(w) + offset);
  }
}

template <bool WBF16, int R, int MB>
inline void avx512_step(const FloatGemvArgs& a, int64_t n, int64_t m0, int64_t k, __mmask16 mask, __m512 (&acc)[R][MB]) {
  const int64_t K = a.K;
  __m512 wv[R];
  for (int r = 0; r < R; ++r) wv[r] = avx512_load_w<WBF16>(a.w, (n + r) * K + k, mask);
  for (int m = 0; m < MB; ++m) {
    const __m512 xv = _mm512_maskz_loadu_ps(mask, a.x_f32 + (m0 + m) * K + k);
    for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(xv, wv[r], acc[r][m]);
  }
}

template <bool WBF16, int R, int MB>
void avx512_block(const FloatGemvArgs& a, int64_t n, int64_t m0, const char* ahead) {
  const int64_t K = a.K;
  const int64_t elem = WBF16 ? 2 : 4;
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (ahead != nullptr && (WBF16 ? (k % 32 == 0) : true))
      for (int r = 0; r < R; ++r) _mm_prefetch(ahead + (r * K + k) * elem, _MM_HINT_T1);
    avx512_step<WBF16, R, MB>(a, n, m0, k, __mmask16(0xFFFF), acc);
  }
  if (k < K) avx512_step<WBF16, R, MB>(a, n, m0, k, __mmask16((1u << (K - k)) - 1), acc);
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      const float sum = _mm512_reduce_add_ps(acc[r][m]);
      a.out[(m0 + m) * a.ldo + n + r] = a.bias ? sum + a.bias[n + r] : sum;
    }
}

template <bool WBF16, int R>
void avx512_tokens(const FloatGemvArgs& a, int64_t n, const char* ahead) {
  constexpr int kTokens = 4;  // 4 rows x 4 tokens = 16 zmm accumulators
  for (int64_t m0 = 0; m0 < a.M; m0 += kTokens) {
    const char* prefetch = m0 == 0 ? ahead : nullptr;  // later token blocks re-read the rows from cache
    switch (std::min<int64_t>(kTokens, a.M - m0)) {
      case 4: avx512_block<WBF16, R, 4>(a, n, m0, prefetch); break;
      case 3: avx512_block<WBF16, R, 3>(a, n, m0, prefetch); break;
      case 2: avx512_block<WBF16, R, 2>(a, n, m0, prefetch); break;
      default: avx512_block<WBF16, R, 1>(a, n, m0, prefetch); break;
    }
  }
}

template <bool WBF16>
void avx512_rows_typed(const FloatGemvArgs& a, int64_t n0, int64_t n1) {
  int64_t n = n0;
  const int64_t elem = WBF16 ? 2 : 4;
  for (; n + kRows <= n1; n += kRows) avx512_tokens<WBF16, kRows>(a, n, next_row_group(a, n, kRows, n1, elem));
  for (; n < n1; ++n) avx512_tokens<WBF16, 1>(a, n, next_row_group(a, n, 1, n1, elem));
}

void avx512_rows(const FloatGemvArgs& a, int64_t n0, int64_t n1) {
  if (a.w_bf16) avx512_rows_typed<true>(a, n0, n1);
  else avx512_rows_typed<false>(a, n0, n1);
}

}  // namespace
}  // namespace bitnet_cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// --------------------------------------------------------------------------------------------- AVX-512 BF16

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")
#endif

namespace bitnet_cpu {
namespace {

//! 32 bf16 pairs-summed by vdpbf16ps: acc += x[2i] * w[2i] + x[2i+1] * w[2i+1] in fp32.
template <int R, int MB>
inline void bf16_step(const FloatGemvArgs& a, int64_t n, int64_t m0, int64_t k, __mmask32 mask, __m512 (&acc)[R][MB]) {
  const int64_t K = a.K;
  const uint16_t* w = static_cast<const uint16_t*>(a.w);
  __m512i wv[R];
  for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_epi16(mask, w + (n + r) * K + k);
  for (int m = 0; m < MB; ++m) {
    const __m512i xv = _mm512_maskz_loadu_epi16(mask, a.x_bf16 + (m0 + m) * K + k);
    for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)xv, (__m512bh)wv[r]);
  }
}

template <int R, int MB>
void bf16_block(const FloatGemvArgs& a, int64_t n, int64_t m0, const char* ahead) {
  const int64_t K = a.K;
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if (ahead != nullptr)
      for (int r = 0; r < R; ++r) _mm_prefetch(ahead + (r * K + k) * 2, _MM_HINT_T1);
    bf16_step<R, MB>(a, n, m0, k, __mmask32(0xFFFFFFFFu), acc);
  }
  if (k < K) bf16_step<R, MB>(a, n, m0, k, __mmask32((1u << (K - k)) - 1), acc);
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      const float sum = _mm512_reduce_add_ps(acc[r][m]);
      a.out[(m0 + m) * a.ldo + n + r] = a.bias ? sum + a.bias[n + r] : sum;
    }
}

template <int R>
void bf16_tokens(const FloatGemvArgs& a, int64_t n, const char* ahead) {
  constexpr int kTokens = 4;
  for (int64_t m0 = 0; m0 < a.M; m0 += kTokens) {
    const char* prefetch = m0 == 0 ? ahead : nullptr;  // later token blocks re-read the rows from cache
    switch (std::min<int64_t>(kTokens, a.M - m0)) {
      case 4: bf16_block<R, 4>(a, n, m0, prefetch); break;
      case 3: bf16_block<R, 3>(a, n, m0, prefetch); break;
      case 2: bf16_block<R, 2>(a, n, m0, prefetch); break;
      default: bf16_block<R, 1>(a, n, m0, prefetch); break;
    }
  }
}

void bf16_rows(const FloatGemvArgs& a, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + kRows <= n1; n += kRows) bf16_tokens<kRows>(a, n, next_row_group(a, n, kRows, n1, 2));
  for (; n < n1; ++n) bf16_tokens<1>(a, n, next_row_group(a, n, 1, n1, 2));
}

}  // namespace
}  // namespace bitnet_cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#pragma GCC diagnostic pop

namespace bitnet_cpu {
namespace {

#else  // not x86-64: the scalar path only

struct GemvFeatures {
  bool avx2 = false, avx512 = false, avx512_bf16 = false;
};
const GemvFeatures& features() {
  static const GemvFeatures f;
  return f;
}

#endif

//! -1: not chosen yet (the fastest supported path is used).
std::atomic<int> g_selected{-1};

GemvIsa best() {
  for (GemvIsa isa : {GemvIsa::Avx512Bf16, GemvIsa::Avx512, GemvIsa::Avx2})
    if (gemv_isa_supported(isa)) return isa;
  return GemvIsa::Scalar;
}

}  // namespace

const char* gemv_isa_name(GemvIsa isa) {
  switch (isa) {
    case GemvIsa::Avx512Bf16: return "avx512_bf16";
    case GemvIsa::Avx512: return "avx512";
    case GemvIsa::Avx2: return "avx2";
    default: return "scalar";
  }
}

bool gemv_isa_supported(GemvIsa isa) {
  switch (isa) {
    case GemvIsa::Avx512Bf16: return features().avx512_bf16;
    case GemvIsa::Avx512: return features().avx512;
    case GemvIsa::Avx2: return features().avx2;
    default: return true;
  }
}

std::vector<std::string> gemv_supported_isa_names() {
  std::vector<std::string> names;
  for (GemvIsa isa : {GemvIsa::Scalar, GemvIsa::Avx2, GemvIsa::Avx512, GemvIsa::Avx512Bf16})
    if (gemv_isa_supported(isa)) names.emplace_back(gemv_isa_name(isa));
  return names;
}

GemvIsa float_gemv_isa() {
  const int selected = g_selected.load(std::memory_order_acquire);
  return selected < 0 ? best() : static_cast<GemvIsa>(selected);
}

bool float_gemv_set_isa(const std::string& name) {
  if (name == "auto") {
    g_selected.store(-1, std::memory_order_release);
    return true;
  }
  for (GemvIsa isa : {GemvIsa::Scalar, GemvIsa::Avx2, GemvIsa::Avx512, GemvIsa::Avx512Bf16})
    if (name == gemv_isa_name(isa)) {
      if (!gemv_isa_supported(isa)) return false;
      g_selected.store(static_cast<int>(isa), std::memory_order_release);
      return true;
    }
  return false;
}

void float_gemv_rows(const FloatGemvArgs& args, int64_t n0, int64_t n1) {
  if (n0 >= n1 || args.M <= 0) return;
#if defined(BITNET_GEMV_X86)
  switch (float_gemv_isa()) {
    case GemvIsa::Avx512Bf16:
      // vdpbf16ps needs bf16 on both sides; an fp32/fp16 x (or an fp32 weight) takes the FMA path.
      if (args.x_bf16 != nullptr && args.w_bf16) return bf16_rows(args, n0, n1);
      return avx512_rows(args, n0, n1);
    case GemvIsa::Avx512: return avx512_rows(args, n0, n1);
    case GemvIsa::Avx2: return avx2_rows(args, n0, n1);
    default: break;
  }
#endif
  scalar_rows(args, n0, n1);
}

}  // namespace bitnet_cpu
