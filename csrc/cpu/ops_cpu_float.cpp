// ATen binding of bitnet::float_linear on CPU (the bandwidth-bound float head) and of its path selector.
//
// float_linear(x, weight, bias) = F.linear(x, weight, bias) with fp32 accumulation, output in x.dtype.
// Decode (M <= kMaxGemvTokens tokens) runs the GEMV kernels of float_gemv.h, rows split over
// at::parallel_for (one contiguous block of output rows per thread, so torch.set_num_threads is
// respected). Prefill (M > kMaxGemvTokens) is compute-bound, where oneDNN's GEMM is the better tool: it
// goes to at::linear when x and the weight share a dtype (fp32 or bf16); a mixed-dtype prefill (e.g. fp32
// x with a bf16 weight, which at::linear refuses and which would need a full fp32 copy of the weight)
// stays on the GEMV kernels, which handle any M (each weight block is reused from L1 for every token).
// On the at::linear route a bias is cast to x.dtype first (F.linear's rule), so a bf16 prefill adds a
// bf16-rounded bias; the GEMV route adds the fp32 bias to the fp32 sum.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/StringUtil.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "float_gemv.h"

namespace bitnet_cpu {
namespace {

//! Up to this many tokens the weight is streamed by the GEMV kernels; beyond it at::linear (oneDNN) wins.
constexpr int64_t kMaxGemvTokens = 8;
//! Minimum output rows per thread (a few KB of weight at least, so small heads are not split needlessly).
constexpr int64_t kRowGrain = 64;

void check_float_linear_args(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "bitnet::float_linear";
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), op, ": x and weight must be CPU tensors, got ",
              x.device(), " and ", weight.device());
  const auto xd = x.scalar_type();
  TORCH_CHECK_TYPE(xd == at::kFloat || xd == at::kBFloat16 || xd == at::kHalf || xd == at::kDouble, op,
                   ": x must be a floating-point tensor (float32, bfloat16 or float16), got dtype ", xd);
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kBFloat16 || weight.scalar_type() == at::kFloat, op,
                   ": weight must be bfloat16 or float32, got dtype ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [N, K], got shape ", weight.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension [..., K]");
  TORCH_CHECK_VALUE(x.size(-1) == weight.size(1), op, ": K of x and weight differ (x has shape ", x.sizes(),
                    ", weight ", weight.sizes(), ")");
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.device().is_cpu(), op, ": bias must be a CPU tensor, got device ", b.device());
    TORCH_CHECK_TYPE(at::isFloatingType(b.scalar_type()), op, ": bias must be floating-point, got dtype ",
                     b.scalar_type());
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == weight.size(0), op, ": bias must have shape [", weight.size(0),
                      "], got ", b.sizes());
  }
}

at::Tensor float_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_float_linear_args(x, weight, bias);
  const int64_t K = weight.size(1), N = weight.size(0);
  const int64_t M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  if (M == 0) return at::empty(out_shape, x.options());

  const bool same_dtype = x.scalar_type() == weight.scalar_type();
  if (M > kMaxGemvTokens && same_dtype) {
    c10::optional<at::Tensor> b;
    if (bias.has_value()) b = bias->to(x.scalar_type());
    return at::linear(x, weight, b);
  }

  const at::Tensor w = weight.contiguous();
  const at::Tensor x2d = x.reshape({M, K});
  const at::Tensor x_f32 = x2d.to(at::kFloat).contiguous();
  at::Tensor x_bf16;
  if (x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16) x_bf16 = x2d.contiguous();
  at::Tensor b_f32;
  if (bias.has_value()) b_f32 = bias->to(at::kFloat).contiguous();
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));

  FloatGemvArgs args;
  args.x_f32 = x_f32.data_ptr<float>();
  args.x_bf16 = x_bf16.defined() ? reinterpret_cast<const uint16_t*>(x_bf16.data_ptr<at::BFloat16>()) : nullptr;
  args.M = M;
  args.K = K;
  args.w = w.data_ptr();
  args.w_bf16 = w.scalar_type() == at::kBFloat16;
  args.bias = b_f32.defined() ? b_f32.data_ptr<float>() : nullptr;
  args.out = out.data_ptr<float>();
  args.ldo = N;
  at::parallel_for(0, N, kRowGrain, [&](int64_t n0, int64_t n1) { float_gemv_rows(args, n0, n1); });
  return out.to(x.scalar_type()).reshape(out_shape);
}

//! Test/benchmark hook: "" reports the active GEMV path, "auto" restores the fastest, else select by name.
std::string float_gemv_isa_op(const std::string& request) {
  if (!request.empty()) {
    bool known = request == "auto";
    for (GemvIsa isa : {GemvIsa::Scalar, GemvIsa::Avx2, GemvIsa::Avx512, GemvIsa::Avx512Bf16})
      known = known || request == gemv_isa_name(isa);
    TORCH_CHECK_VALUE(known, "bitnet::_float_gemv_isa: unknown path '", request,
                      "' (expected '', 'auto', 'scalar', 'avx2', 'avx512' or 'avx512_bf16')");
    TORCH_CHECK(float_gemv_set_isa(request), "bitnet::_float_gemv_isa: '", request,
                "' is not supported by this CPU (supported: ", c10::Join(", ", gemv_supported_isa_names()), ")");
  }
  return gemv_isa_name(float_gemv_isa());
}

std::vector<std::string> float_gemv_isa_available() { return gemv_supported_isa_names(); }

}  // namespace
}  // namespace bitnet_cpu

TORCH_LIBRARY_IMPL(bitnet, CPU, m) { m.impl("float_linear", &bitnet_cpu::float_linear); }

TORCH_LIBRARY_IMPL(bitnet, CompositeExplicitAutograd, m) {
  m.impl("_float_gemv_isa", &bitnet_cpu::float_gemv_isa_op);
  m.impl("_float_gemv_isa_available", &bitnet_cpu::float_gemv_isa_available);
}
