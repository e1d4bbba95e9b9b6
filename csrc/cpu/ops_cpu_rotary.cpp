// ATen binding of bitnet::rotary_embedding on CPU: Transformers' apply_rotary_pos_emb in one pass, bit for bit.
//
// rotary_embedding(q, k, cos, sin) = (q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin) with cos and
// sin [B|1, L, D] broadcast over the heads of q [B, Hq, L, D] and k [B, Hk, L, D], rotate_half(x) = cat(-x2, x1).
// Every element goes through the same three roundings to the tensors' dtype as those ATen calls (the product
// with cos, the product of the rotated half with sin, their sum; each computed in fp32 without contraction), so
// the results are identical; what it saves is the fourteen ATen calls (slices, negations, concatenations,
// products, sums) that the composite spends on a decode step's few rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <utility>

namespace bitnet_cpu {
namespace {

constexpr const char* kOp = "bitnet::rotary_embedding";
//! Elements per thread below which rows are not split over threads.
constexpr int64_t kElementsPerTask = 1 << 16;

void check_rotary_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"q", q}, {"k", k}, {"cos", cos}, {"sin", sin}}) {
    TORCH_CHECK(t.device().is_cpu(), kOp, ": ", name, " must be a CPU tensor, got device ", t.device());
    TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), kOp, ": q, k, cos and sin must share a dtype, got ", name,
                     " ", t.scalar_type(), " and q ", q.scalar_type());
  }
  const auto d = q.scalar_type();
  TORCH_CHECK_TYPE(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, kOp,
                   ": q must be float32, bfloat16 or float16, got dtype ", d);
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4, kOp, ": q and k must be 4-D [batch, heads, length, head_dim], got ",
                    q.sizes(), " and ", k.sizes());
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3), kOp,
                    ": q and k differ in batch, length or head_dim: ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK_VALUE(q.size(3) % 2 == 0, kOp, ": head_dim must be even, got ", q.size(3));
  TORCH_CHECK_VALUE(cos.sizes() == sin.sizes() && cos.dim() == 3 && (cos.size(0) == q.size(0) || cos.size(0) == 1) &&
                        cos.size(1) == q.size(2) && cos.size(2) == q.size(3),
                    kOp, ": cos and sin must be [batch or 1, length, head_dim] = [", q.size(0), ", ", q.size(2), ", ",
                    q.size(3), "], got ", cos.sizes(), " and ", sin.sizes());
}

//! out = x * cos + rotate_half(x) * sin for every row of x [B, H, L, D] (contiguous), with the composite's roundings.
template <typename T>
void rotate_rows(const T* x, const T* cos, const T* sin, T* out, int64_t B, int64_t H, int64_t L, int64_t D,
                 int64_t cs_batch_stride) {
  const int64_t half = D / 2, rows = B * H * L;
  auto round = [](float v) { return static_cast<float>(static_cast<T>(v)); };
  at::parallel_for(0, rows, std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (H * L), l = r % L;
      const T* xr = x + r * D;
      const T* c = cos + b * cs_batch_stride + l * D;
      const T* s = sin + b * cs_batch_stride + l * D;
      T* o = out + r * D;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = static_cast<float>(xr[i]), x2 = static_cast<float>(xr[i + half]);
        o[i] = static_cast<T>(round(x1 * static_cast<float>(c[i])) + round(-x2 * static_cast<float>(s[i])));
        o[i + half] = static_cast<T>(round(x2 * static_cast<float>(c[i + half])) +
                                     round(x1 * static_cast<float>(s[i + half])));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rotary_embedding(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                    const at::Tensor& sin) {
  check_rotary_args(q, k, cos, sin);
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor q_out = at::empty(q.sizes(), q.options()), k_out = at::empty(k.sizes(), k.options());
  const int64_t B = q.size(0), L = q.size(2), D = q.size(3);
  const int64_t cs_batch_stride = cos.size(0) == 1 ? 0 : L * D;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rotary_embedding", [&] {
    rotate_rows<scalar_t>(qc.data_ptr<scalar_t>(), cc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(),
                          q_out.data_ptr<scalar_t>(), B, q.size(1), L, D, cs_batch_stride);
    rotate_rows<scalar_t>(kc.data_ptr<scalar_t>(), cc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(),
                          k_out.data_ptr<scalar_t>(), B, k.size(1), L, D, cs_batch_stride);
  });
  return {q_out, k_out};
}

}  // namespace
}  // namespace bitnet_cpu

TORCH_LIBRARY_IMPL(bitnet, CPU, m) { m.impl("rotary_embedding", &bitnet_cpu::rotary_embedding); }
