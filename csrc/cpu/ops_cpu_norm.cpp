// ATen binding of bitnet::rms_norm on CPU: BitNet's RMSNorm in one pass per row, for inference.
//
// rms_norm(x, weight, eps) = weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype), x32 = x in fp32, the
// product in the promoted dtype of weight and x (Transformers' BitNetRMSNorm). Every step is the same fp32
// operation as those ATen calls except the sum of squares, whose order of additions differs, so a result can
// differ from them in the last bit of the variance (and, rarely, by one unit in the last place of a bf16 output).
// What it saves is the eight ATen calls (conversions, reduction, elementwise ops, several with a parallel
// region) that the composite spends on a decode step's one row: about 100 us per norm on 2 cores, four norms a
// layer. Rows are split over threads only when there are enough of them to pay for a parallel region.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "fp32_loops.h"

namespace bitnet_cpu {
namespace {

constexpr const char* kOp = "bitnet::rms_norm";
//! Elements per thread below which rows are not split over threads.
constexpr int64_t kElementsPerTask = 1 << 16;

void check_rms_norm_args(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), kOp, ": x and weight must be CPU tensors, got ",
              x.device(), " and ", weight.device());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"x", x}, {"weight", weight}}) {
    const auto d = t.scalar_type();
    TORCH_CHECK_TYPE(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, kOp, ": ", name,
                     " must be float32, bfloat16 or float16, got dtype ", d);
  }
  TORCH_CHECK_VALUE(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1), kOp,
                    ": weight must have shape [hidden] matching the last dimension of x, got x ", x.sizes(),
                    " and weight ", weight.sizes());
}

template <typename T, typename O>
void rms_norm_rows(const T* x, const float* w, O* out, int64_t rows, int64_t K, float eps) {
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(K, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(K);
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * K;
      for (int64_t k = 0; k < K; ++k) row[k] = static_cast<float>(xr[k]);
      const float variance = sum_squares(row.data(), K) / static_cast<float>(K);
      const float inv = 1.f / std::sqrt(variance + eps);
      O* o = out + r * K;
      for (int64_t k = 0; k < K; ++k) {
        const T normed = static_cast<T>(row[k] * inv);  // back to the input dtype, as the composite does
        o[k] = static_cast<O>(w[k] * static_cast<float>(normed));
      }
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm_args(x, weight);
  const at::ScalarType out_dtype = at::promote_types(x.scalar_type(), weight.scalar_type());
  const at::Tensor xc = x.contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();  // exact for every accepted dtype
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(out_dtype));
  const int64_t K = x.size(-1);
  const int64_t rows = K == 0 ? 0 : x.numel() / K;
  if (rows == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_dtype, "rms_norm_out", [&] {
      rms_norm_rows<T, scalar_t>(xc.data_ptr<T>(), w.data_ptr<float>(), out.data_ptr<scalar_t>(), rows, K,
                                 static_cast<float>(eps));
    });
  });
  return out;
}

}  // namespace
}  // namespace bitnet_cpu

TORCH_LIBRARY_IMPL(bitnet, CPU, m) { m.impl("rms_norm", &bitnet_cpu::rms_norm); }
