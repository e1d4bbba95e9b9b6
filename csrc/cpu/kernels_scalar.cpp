// bitnet CPU kernels: the portable scalar implementation (any CPU, any compiler).
//
// Layout and contract: see kernel_api.h. This file is the slow but obviously correct path that the
// runtime dispatcher uses when the CPU has neither AVX2 nor AVX-512, and that the tests force to check
// the dispatch itself. It reads each packed row once per token block of four.
#include "kernel_api.h"
#include "scalar_common.h"

namespace bitnet_cpu {
namespace {

void quantize_rows(const void* x, FloatKind kind, int64_t K, int64_t r0, int64_t r1, int8_t* x_q, int64_t lda,
                   float* scale, int32_t* row_sum) {
  const int64_t elem = kind == FloatKind::F32 ? 4 : 2;
  for (int64_t r = r0; r < r1; ++r) {
    const void* row = static_cast<const char*>(x) + r * K * elem;
    const int32_t s = quantize_row_scalar(row, kind, K, x_q + r * lda, scale + r);
    if (row_sum != nullptr) row_sum[r] = s;
  }
}

void ternary_gemm(const int8_t* x_q, int64_t lda, const int32_t* x_sum, int64_t K, int64_t m0, int64_t m1,
                  const uint8_t* packed, int64_t P, int64_t p0, int64_t p1, const OutputSpec& out) {
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* row = packed + p * K;
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* x = x_q + m * lda;
      int32_t acc[4] = {0, 0, 0, 0};
      for (int64_t k = 0; k < K; ++k) {
        const int32_t b = row[k];
        const int32_t v = x[k];
        acc[0] += (b & 3) * v;
        acc[1] += ((b >> 2) & 3) * v;
        acc[2] += ((b >> 4) & 3) * v;
        acc[3] += (b >> 6) * v;
      }
      for (int i = 0; i < 4; ++i) store_output(out, m, i * P + p, acc[i] - x_sum[m]);
    }
  }
}

void int8_gemm(const int8_t* x_q, int64_t lda, int64_t K, int64_t m0, int64_t m1, const int8_t* w, int64_t n0,
               int64_t n1, const OutputSpec& out) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = w + n * K;
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* x = x_q + m * lda;
      int32_t acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += int32_t(x[k]) * int32_t(row[k]);
      store_output(out, m, n, acc);
    }
  }
}

}  // namespace

const KernelTable& scalar_kernels() {
  static const KernelTable table{"scalar", quantize_rows, ternary_gemm, int8_gemm, pack_rows_scalar};
  return table;
}

}  // namespace bitnet_cpu
