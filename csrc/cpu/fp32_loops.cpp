// The fp32 loops declared in fp32_loops.h (one definition, so every caller adds in the same order).
#include "fp32_loops.h"

namespace bitnet_cpu {

BITNET_ISA_CLONES float sum_squares(const float* v, int64_t n) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float square = v[i] * v[i];  // as x.pow(2) in fp32
    sum += double(square);
  }
  return float(sum);
}

}  // namespace bitnet_cpu
