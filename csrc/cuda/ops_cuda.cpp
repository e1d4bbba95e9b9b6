// ATen bindings of the bitnet CUDA kernels: argument checks, layout preparation, kernel selection.
//
// The kernels (launch.h, *.cuh, *.cu) are torch-free; this file turns tensors into raw pointers, makes
// inputs contiguous, allocates outputs with the caching allocator, and launches on the current CUDA stream
// of the input's device. Nothing here synchronises with the host (no .item(), no blocking copies), so
// every op can be captured in a CUDA graph. Compiled by the host compiler (no device code), which keeps
// nvcc away from the ATen headers.
//
// Kernel selection for a linear with M tokens:
//   M <= 16 (decode): one fused launch (quantize in the prologue + GEMV, gemv.cuh);
//   M > 16 on sm_80+ (prefill): quantize to padded int8 codes, then the int8 tensor-core GEMM (gemm.cuh);
//   M > 16 before sm_80: the decode kernel over slices of 16 tokens (correct, not fast).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>
#include <mutex>
#include <tuple>
#include <unordered_map>

#include "launch.h"

namespace bitnet_cuda {
namespace {

//! SPEC §1: lower bound of the weight absmean (the same constant as bitnet_torch.quant.SCALE_EPS).
constexpr double kWeightScaleEps = 1e-5;
//! SPEC §3: ternary values per packed byte.
constexpr int64_t kPackedValuesPerByte = 4;
//! Decode kernel token slice used on GPUs without int8 mma (and the M threshold of the decode path).
constexpr int64_t kDecodeSlice = 16;
//! Rows of padded codes are a multiple of this, so the GEMM reads them with 16-byte loads.
constexpr int64_t kCodeRowAlign = 16;
//! CUDA grid y limit and the GEMM's token tile: the largest M one GEMM launch covers.
constexpr int64_t kMaxGemmTokens = 65535LL * 128;
//! Bound on K of every linear (as on CPU, csrc/cpu/kernel_api.h, and bitnet_torch/_op_checks.py MAX_K): the exact
//! int32 accumulators hold |sum| <= 128 * 128 * K only for K < 2^17.
constexpr int64_t kMaxK = int64_t(1) << 17;

// ------------------------------------------------------------------------------------------------ checks

bool is_float_input(const at::Tensor& t) {
  const auto d = t.scalar_type();
  return d == at::kFloat || d == at::kBFloat16 || d == at::kHalf || d == at::kDouble;
}

void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(is_float_input(t), op, ": ", name,
                   " must be a floating-point tensor (float32, bfloat16 or float16), got dtype ", t.scalar_type());
}

void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but the input is on ", x.device(),
              "; move both to the same CUDA device");
}

ElemKind elem_kind(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return ElemKind::kBFloat16;
    case at::kHalf: return ElemKind::kFloat16;
    case at::kInt: return ElemKind::kInt32;
    default: return ElemKind::kFloat32;
  }
}

//! A contiguous fp32/bf16/fp16 copy-or-view of a float tensor (float64 is computed in fp32, as the reference
//! does: it quantizes x.float()).
at::Tensor kernel_float(const at::Tensor& t) {
  return (t.scalar_type() == at::kDouble ? t.to(at::kFloat) : t).contiguous();
}

int64_t elem_size(ElemKind kind) {
  return kind == ElemKind::kBFloat16 || kind == ElemKind::kFloat16 ? 2 : 4;
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

//! SM count, opt-in shared memory and compute capability of a device, read once (attribute queries only).
const DeviceInfo& device_info(c10::DeviceIndex index) {
  static std::mutex mutex;
  static std::unordered_map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(index);
  if (found != cache.end()) return found->second;
  DeviceInfo info;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, index));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.max_smem_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, index));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.cc_major, cudaDevAttrComputeCapabilityMajor, index));
  return cache.emplace(index, info).first->second;
}

//! Element offset of row `row` of a row-major buffer, as a byte pointer.
const void* row_pointer(const void* base, int64_t row, int64_t ld, int64_t elem_size) {
  return static_cast<const char*>(base) + row * ld * elem_size;
}

// ------------------------------------------------------------------------------------------------ linear driver

/// Run out = epilogue(x W^T) for float activations `x2d` [M, K] (contiguous, fp32/bf16/fp16) or int8 codes
/// `codes2d` [M, K] (unit stride along K), choosing decode / prefill kernels as described at the top.
void run_linear(const at::Tensor& x2d, const at::Tensor& codes2d, LinearOperands op, const char* op_name) {
  const bool float_input = x2d.defined();
  const at::Tensor& input = float_input ? x2d : codes2d;
  const int64_t m = input.size(0);
  const int64_t k = input.size(1);
  if (m == 0 || op.n == 0) return;
  const DeviceInfo& device = device_info(input.device().index());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.device().index()).stream();

  Activations a;
  a.m = m;
  a.k = k;
  if (float_input) {
    a.x = x2d.data_ptr();
    a.x_kind = elem_kind(x2d);
    a.ldx = k;
  } else {
    a.codes = codes2d.data_ptr<int8_t>();
    a.ldq = codes2d.stride(0);
    a.codes_aligned16 = aligned16(a.codes);
  }

  if (decode_supported(m, k, device)) {
    launch_linear_gemv(a, op, device, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if (gemm_supported(device)) {
    TORCH_CHECK(m <= kMaxGemmTokens, op_name, ": ", m, " tokens exceed one launch's limit of ", kMaxGemmTokens);
    at::Tensor codes;
    at::Tensor scales;
    if (float_input) {
      const int64_t ldq = (k + kCodeRowAlign - 1) / kCodeRowAlign * kCodeRowAlign;
      codes = at::empty({m, ldq}, x2d.options().dtype(at::kChar));
      scales = at::empty({m}, x2d.options().dtype(at::kFloat));
      launch_quantize_activation(a.x, a.x_kind, k, m, k, codes.data_ptr<int8_t>(), ldq, ldq,
                                 scales.data_ptr<float>(), device, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      a.x = nullptr;
      a.codes = codes.data_ptr<int8_t>();
      a.ldq = ldq;
      a.codes_aligned16 = aligned16(a.codes);
      a.scales = scales.data_ptr<float>();
    }
    launch_linear_gemm(a, op, device, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // Pre-Ampere GPU: the decode kernel on slices of 16 tokens.
  TORCH_CHECK(decode_supported(kDecodeSlice, k, device), op_name, ": K=", k,
              " is too long for the decode kernel's shared memory and this GPU (compute capability ",
              device.cc_major, ".x) has no int8 mma (needs sm_80+)");
  const int64_t elem = float_input ? x2d.element_size() : 1;
  for (int64_t m0 = 0; m0 < m; m0 += kDecodeSlice) {
    Activations slice = a;
    slice.m = std::min(kDecodeSlice, m - m0);
    if (float_input) {
      slice.x = row_pointer(a.x, m0, a.ldx, elem);
    } else {
      slice.codes = static_cast<const int8_t*>(row_pointer(a.codes, m0, a.ldq, 1));
    }
    LinearOperands part = op;
    part.out = const_cast<void*>(row_pointer(op.out, m0, op.ldo, elem_size(op.out_kind)));
    launch_linear_gemv(slice, part, device, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

//! Checks shared by the float-input linears; returns x as a contiguous 2-D kernel input.
at::Tensor linear_input(const at::Tensor& x, int64_t k, const char* op, const char* weight_name) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  check_float(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension (the feature dimension)");
  TORCH_CHECK_VALUE(x.size(-1) == k, op, ": K of x (", x.size(-1), ") and ", weight_name, " (", k, ") differ");
  TORCH_CHECK_VALUE(k < kMaxK, op, ": K=", k, " exceeds the supported maximum ", kMaxK - 1);
  int64_t m = 1;  // not reshape({-1, k}): that is ambiguous for K = 0
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  return kernel_float(x).reshape({m, k});
}

//! Fills the scale / bias / output fields of `op` and returns the output [M, N] (fp32 for a float64 x).
at::Tensor linear_output(const at::Tensor& x, const at::Tensor& x2d, int64_t n, const at::Tensor& weight_scale,
                         const std::optional<at::Tensor>& bias, LinearOperands& op, at::Tensor& scale_keep,
                         at::Tensor& bias_keep, const char* op_name) {
  check_same_device(weight_scale, x, op_name, "weight_scale");
  check_float(weight_scale, op_name, "weight_scale");
  scale_keep = kernel_float(weight_scale);
  op.weight_scale = scale_keep.data_ptr();
  op.weight_scale_kind = elem_kind(scale_keep);
  if (bias.has_value() && bias->defined()) {
    check_same_device(*bias, x, op_name, "bias");
    check_float(*bias, op_name, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, op_name, ": bias must have shape [", n, "], got ",
                      bias->sizes());
    bias_keep = kernel_float(*bias);
    op.bias = bias_keep.data_ptr();
    op.bias_kind = elem_kind(bias_keep);
  }
  at::Tensor out = at::empty({x2d.size(0), n}, x2d.options());
  op.n = n;
  op.out = out.data_ptr();
  op.out_kind = elem_kind(out);
  op.ldo = n;
  return out;
}

//! K = 0: no products, so out [M, N] is the epilogue of acc = 0, float(0) * (x_scale * w_scale) (+ bias), with
//! the scale of a token without features, x_scale = 1e-5 / 127 (the reference's math; NaN for a NaN scale).
void fill_empty_k(at::Tensor& out, const at::Tensor& scale_keep, const at::Tensor& bias_keep) {
  const at::Tensor x_scale = at::full({1, 1}, 1e-5f / 127.0f, out.options().dtype(at::kFloat));
  at::Tensor y = at::zeros(out.sizes(), out.options().dtype(at::kFloat)) *
                 (x_scale * scale_keep.to(at::kFloat).reshape({1, -1}));
  if (bias_keep.defined()) y = y + bias_keep.to(at::kFloat).reshape({1, -1});
  out.copy_(y);
}

//! [M, N] → x.shape[:-1] + [N] in x.dtype.
at::Tensor finish_output(const at::Tensor& x, const at::Tensor& out2d, int64_t n) {
  auto shape = x.sizes().vec();
  shape.back() = n;
  return out2d.to(x.scalar_type()).reshape(shape);
}

// ------------------------------------------------------------------------------------------------ ops

std::tuple<at::Tensor, at::Tensor> quantize_activation_cuda(const at::Tensor& x) {
  constexpr const char* op = "bitnet::quantize_activation";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  check_float(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension (the feature dimension)");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor input = kernel_float(x);
  const int64_t k = x.size(-1);
  auto scale_shape = x.sizes().vec();
  scale_shape.back() = 1;
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scales = at::empty(scale_shape, x.options().dtype(at::kFloat));
  const int64_t m = scales.numel();
  if (m > 0) {
    launch_quantize_activation(input.data_ptr(), elem_kind(input), k, m, k, codes.data_ptr<int8_t>(), k, k,
                               scales.data_ptr<float>(), device_info(x.device().index()),
                               c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {codes, scales};
}

at::Tensor ternary_matmul_cuda(const at::Tensor& x_q, const at::Tensor& packed) {
  constexpr const char* op = "bitnet::ternary_matmul";
  TORCH_CHECK(x_q.is_cuda(), op, ": x_q must be a CUDA tensor, got device ", x_q.device());
  check_same_device(packed, x_q, op, "packed");
  TORCH_CHECK_TYPE(x_q.scalar_type() == at::kChar, op, ": x_q must be int8, got ", x_q.scalar_type());
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK_VALUE(x_q.dim() == 2, op, ": x_q must be 2-D [M, K], got shape ", x_q.sizes());
  TORCH_CHECK_VALUE(packed.dim() == 2, op, ": packed must be 2-D [N/4, K], got shape ", packed.sizes());
  TORCH_CHECK_VALUE(x_q.size(1) == packed.size(1), op, ": K of x_q (", x_q.size(1), ") and packed (",
                    packed.size(1), ") differ");
  TORCH_CHECK_VALUE(x_q.size(1) < kMaxK, op, ": K=", x_q.size(1), " exceeds the supported maximum ", kMaxK - 1);
  const c10::cuda::CUDAGuard guard(x_q.device());
  const at::Tensor codes = x_q.stride(1) == 1 ? x_q : x_q.contiguous();
  const at::Tensor weight = packed.contiguous();
  const int64_t n = packed.size(0) * kPackedValuesPerByte;
  at::Tensor out = at::empty({x_q.size(0), n}, x_q.options().dtype(at::kInt));
  LinearOperands operands;
  operands.weight = weight.data_ptr<uint8_t>();
  operands.format = WeightFormat::kTernaryPacked;
  operands.weight_aligned16 = aligned16(operands.weight);
  operands.n = n;
  operands.out = out.data_ptr();
  operands.out_kind = ElemKind::kInt32;
  operands.ldo = n;
  if (x_q.size(1) == 0) return out.zero_();
  run_linear(at::Tensor(), codes, operands, op);
  return out;
}

at::Tensor ternary_linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& weight_scale,
                               const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "bitnet::ternary_linear";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  check_same_device(packed, x, op, "packed");
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() == 2, op, ": packed must be 2-D [N/4, K], got shape ", packed.sizes());
  TORCH_CHECK_VALUE(weight_scale.numel() == 1, op, ": weight_scale must have one element, got shape ",
                    weight_scale.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t k = packed.size(1);
  const int64_t n = packed.size(0) * kPackedValuesPerByte;
  const at::Tensor x2d = linear_input(x, k, op, "packed");
  const at::Tensor weight = packed.contiguous();
  LinearOperands operands;
  operands.weight = weight.data_ptr<uint8_t>();
  operands.format = WeightFormat::kTernaryPacked;
  operands.weight_aligned16 = aligned16(operands.weight);
  at::Tensor scale_keep, bias_keep;
  at::Tensor out = linear_output(x, x2d, n, weight_scale, bias, operands, scale_keep, bias_keep, op);
  if (k == 0) {
    fill_empty_k(out, scale_keep, bias_keep);
  } else {
    run_linear(x2d, at::Tensor(), operands, op);
  }
  return finish_output(x, out, n);
}

at::Tensor int8_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                            const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "bitnet::int8_linear";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  check_same_device(weight, x, op, "weight");
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kChar, op, ": weight must be int8, got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [N, K], got shape ", weight.sizes());
  const int64_t n = weight.size(0);
  const int64_t k = weight.size(1);
  TORCH_CHECK_VALUE(weight_scale.numel() == n, op, ": weight_scale must hold one scale per output row (", n,
                    "), got shape ", weight_scale.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2d = linear_input(x, k, op, "weight");
  const at::Tensor w = weight.contiguous();
  LinearOperands operands;
  operands.weight = reinterpret_cast<const uint8_t*>(w.data_ptr<int8_t>());
  operands.format = WeightFormat::kInt8Rows;
  operands.weight_aligned16 = aligned16(operands.weight);
  at::Tensor scale_keep, bias_keep;
  at::Tensor out = linear_output(x, x2d, n, weight_scale, bias, operands, scale_keep, bias_keep, op);
  if (k == 0) {
    fill_empty_k(out, scale_keep, bias_keep);
  } else {
    run_linear(x2d, at::Tensor(), operands, op);
  }
  return finish_output(x, out, n);
}

//! The grouped projection (q/k/v, gate/up) on CUDA: one fused launch per member (the decode GEMV quantizes
//! the activations inside its own launch, so sharing the quantization would save nothing there).
std::vector<at::Tensor> ternary_linear_group_cuda(const at::Tensor& x, at::TensorList packed,
                                                  at::TensorList weight_scale,
                                                  const c10::List<std::optional<at::Tensor>>& bias) {
  constexpr const char* op = "bitnet::ternary_linear_group";
  TORCH_CHECK_VALUE(packed.size() >= 1, op, ": packed must hold at least one weight");
  TORCH_CHECK_VALUE(weight_scale.size() == packed.size(), op, ": got ", packed.size(), " packed weights but ",
                    weight_scale.size(), " weight scales");
  TORCH_CHECK_VALUE(bias.size() == packed.size(), op, ": got ", packed.size(), " packed weights but ", bias.size(),
                    " biases (use None)");
  std::vector<at::Tensor> outputs;
  outputs.reserve(packed.size());
  for (size_t g = 0; g < packed.size(); ++g)
    outputs.push_back(ternary_linear_cuda(x, packed[g], weight_scale[g], bias.get(g)));
  return outputs;
}

std::tuple<at::Tensor, at::Tensor> quantize_pack_weight_cuda(const at::Tensor& w) {
  constexpr const char* op = "bitnet::quantize_pack_weight";
  TORCH_CHECK(w.is_cuda(), op, ": w must be a CUDA tensor, got device ", w.device());
  check_float(w, op, "w");
  TORCH_CHECK_VALUE(w.dim() == 2, op, ": w must be 2-D [N, K], got shape ", w.sizes());
  TORCH_CHECK_VALUE(w.numel() > 0, op, ": cannot quantize an empty weight (mean |W| is undefined)");
  TORCH_CHECK_VALUE(w.size(0) % kPackedValuesPerByte == 0, op, ": out_features=", w.size(0),
                    " is not a multiple of 4: the packed checkpoint layout (SPEC §3) stores 4 output rows per byte");
  const c10::cuda::CUDAGuard guard(w.device());
  const at::Tensor input = kernel_float(w);
  // The absmean with the same ATen reduction as the reference on this device (bit-identical scale).
  at::Tensor scale = at::clamp(input.to(at::kFloat).abs().mean(), kWeightScaleEps, std::nullopt);
  at::Tensor packed = at::empty({w.size(0) / kPackedValuesPerByte, w.size(1)}, w.options().dtype(at::kByte));
  launch_quantize_pack_weight(input.data_ptr(), elem_kind(input), w.size(0), w.size(1), scale.data_ptr<float>(),
                              packed.data_ptr<uint8_t>(), device_info(w.device().index()),
                              c10::cuda::getCurrentCUDAStream(w.device().index()).stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {packed, scale};
}

}  // namespace
}  // namespace bitnet_cuda

TORCH_LIBRARY_IMPL(bitnet, CUDA, m) {
  m.impl("quantize_activation", &bitnet_cuda::quantize_activation_cuda);
  m.impl("ternary_matmul", &bitnet_cuda::ternary_matmul_cuda);
  m.impl("ternary_linear", &bitnet_cuda::ternary_linear_cuda);
  m.impl("ternary_linear_group", &bitnet_cuda::ternary_linear_group_cuda);
  m.impl("quantize_pack_weight", &bitnet_cuda::quantize_pack_weight_cuda);
  m.impl("int8_linear", &bitnet_cuda::int8_linear_cuda);
}
