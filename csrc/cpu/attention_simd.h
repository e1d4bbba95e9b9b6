// bitnet CPU kernels: the decode engine's SIMD attention loops, written once for any fp32 vector width
// (torch-free).
//
// kernel_api.h AttentionScoresFn / AttentionValuesFn for head_dim a multiple of 16. Scores: 4 keys x up to
// kMaxHeads query heads per pass, 4 * heads accumulators over D, reduced four at a time (one horizontal
// reduction per 4 dot products instead of one each). Values: up to 4 heads x 2 vectors of columns held in
// registers over blocks of 8 rows (the portable axpy per row was load/store bound; registers over all rows read
// the cache with a D-element stride and were slower still).
//
// An ISA's translation unit includes this after its target pragma and <immintrin.h>, and instantiates the loops
// with its vector type V, which supplies:
//   using reg;  static constexpr int64_t kLanes;
//   static reg zero();  static reg load(const float*);  static void store(float*, reg);  static reg splat(float);
//   static reg madd(reg a, reg b, reg acc);          // acc + a * b, fused or not: this fixes the ISA's rounding
//   static reg cache(const void* rows, bool bf16, int64_t j, int64_t D, int64_t c);  // row j, columns c.., as fp32
//   static __m128 reduce4(reg, reg, reg, reg);       // the four sums, v0 in lane 0
#pragma once

#include <algorithm>
#include <cstdint>

namespace bitnet_cpu {

template <class V, int GB>
void simd_attention_scores_block(const float* q, const void* keys, bool bf16, int64_t len, int64_t D, float scale,
                                 float* scores) {
  using reg = typename V::reg;
  for (int64_t j = 0; j < len; j += 4) {
    const int64_t nj = std::min<int64_t>(4, len - j);
    reg acc[GB][4];
    for (int g = 0; g < GB; ++g)
      for (int t = 0; t < 4; ++t) acc[g][t] = V::zero();
    for (int64_t c = 0; c < D; c += V::kLanes) {
      reg k[4];
      for (int t = 0; t < 4; ++t) k[t] = t < nj ? V::cache(keys, bf16, j + t, D, c) : V::zero();
      for (int g = 0; g < GB; ++g) {
        const reg qv = V::load(q + g * D + c);
        for (int t = 0; t < 4; ++t) acc[g][t] = V::madd(qv, k[t], acc[g][t]);
      }
    }
    for (int g = 0; g < GB; ++g) {
      alignas(16) float sums[4];
      _mm_store_ps(sums, _mm_mul_ps(V::reduce4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]), _mm_set1_ps(scale)));
      for (int64_t t = 0; t < nj; ++t) scores[g * len + j + t] = sums[t];
    }
  }
}

//! Scores of G query heads, kMaxHeads (<= 4: what fits the ISA's registers) at a time.
template <class V, int kMaxHeads>
void simd_attention_scores(const float* q, int64_t G, const void* keys, bool bf16, int64_t len, int64_t D,
                           float scale, float* scores) {
  static_assert(kMaxHeads >= 1 && kMaxHeads <= 4, "1..4 heads per pass");
  for (int64_t g = 0; g < G; g += kMaxHeads) {
    const float* qg = q + g * D;
    float* sg = scores + g * len;
    switch (std::min<int64_t>(kMaxHeads, G - g)) {  // never more than kMaxHeads: the min only bounds instances
      case 4: simd_attention_scores_block<V, std::min(4, kMaxHeads)>(qg, keys, bf16, len, D, scale, sg); break;
      case 3: simd_attention_scores_block<V, std::min(3, kMaxHeads)>(qg, keys, bf16, len, D, scale, sg); break;
      case 2: simd_attention_scores_block<V, std::min(2, kMaxHeads)>(qg, keys, bf16, len, D, scale, sg); break;
      default: simd_attention_scores_block<V, 1>(qg, keys, bf16, len, D, scale, sg); break;
    }
  }
}

//! Rows in blocks of 8: for each 2 * kLanes columns, the GB heads' sums are loaded once, take the 8 rows'
//! products (independent multiply-add chains) and are stored once; the rows of a block are read once, in order.
template <class V, int GB>
void simd_attention_values_block(const float* p, const void* values, bool bf16, int64_t len, int64_t D, float* acc) {
  using reg = typename V::reg;
  constexpr int64_t RB = 8, L = V::kLanes;
  for (int64_t j0 = 0; j0 < len; j0 += RB) {
    const int64_t j1 = std::min(len, j0 + RB);
    for (int64_t c = 0; c < D; c += 2 * L) {
      const bool two = c + 2 * L <= D;  // D is a multiple of 16: with 16 lanes the last block may hold one vector
      reg o[GB][2];
      for (int g = 0; g < GB; ++g) {
        o[g][0] = V::load(acc + g * D + c);
        o[g][1] = two ? V::load(acc + g * D + c + L) : V::zero();
      }
      for (int64_t j = j0; j < j1; ++j) {
        const reg v0 = V::cache(values, bf16, j, D, c);
        const reg v1 = two ? V::cache(values, bf16, j, D, c + L) : V::zero();
        for (int g = 0; g < GB; ++g) {
          const reg a = V::splat(p[g * len + j]);
          o[g][0] = V::madd(a, v0, o[g][0]);
          o[g][1] = V::madd(a, v1, o[g][1]);
        }
      }
      for (int g = 0; g < GB; ++g) {
        V::store(acc + g * D + c, o[g][0]);
        if (two) V::store(acc + g * D + c + L, o[g][1]);
      }
    }
  }
}

template <class V>
void simd_attention_values(const float* p, int64_t G, const void* values, bool bf16, int64_t len, int64_t D,
                           float* acc) {
  for (int64_t g = 0; g < G; g += 4) {
    const float* pg = p + g * len;
    float* ag = acc + g * D;
    switch (std::min<int64_t>(4, G - g)) {
      case 4: simd_attention_values_block<V, 4>(pg, values, bf16, len, D, ag); break;
      case 3: simd_attention_values_block<V, 3>(pg, values, bf16, len, D, ag); break;
      case 2: simd_attention_values_block<V, 2>(pg, values, bf16, len, D, ag); break;
      default: simd_attention_values_block<V, 1>(pg, values, bf16, len, D, ag); break;
    }
  }
}

}  // namespace bitnet_cpu
