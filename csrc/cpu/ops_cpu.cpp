// ATen bindings of the bitnet CPU kernels: argument checks, layout preparation, threading, ISA dispatch.
//
// The kernels (kernel_api.h) are torch-free; this file turns tensors into raw pointers, makes inputs
// contiguous, pads int8 activations to a multiple of four columns, splits the work over at::parallel_for
// (so torch.set_num_threads is respected) and picks the kernel table of the active instruction set:
// the fastest one cpuid reports, unless BITNET_TORCH_CPU_ISA=scalar|avx2|avx512|amx|auto or the utility op
// bitnet::_cpu_isa says otherwise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "isa.h"
#include "kernel_api.h"

namespace bitnet_cpu {
namespace {

constexpr const char* kIsaEnv = "BITNET_TORCH_CPU_ISA";
//! Rows of activations per prefill block: their int8 codes stay in L2 while a weight tile sweeps them.
constexpr int64_t kPrefillRowBlock = 256;
//! Output rows per prefill work item of the int8 kernel.
constexpr int64_t kInt8TileN = 64;
//! Minimum elements per thread for the element-wise passes.
constexpr int64_t kElementGrain = 1 << 15;

std::atomic<const KernelTable*> g_active{nullptr};

Isa isa_from_environment() {
  const Isa best = best_isa();
  const char* env = std::getenv(kIsaEnv);
  if (env == nullptr || *env == '\0' || std::string(env) == "auto") return best;
  Isa requested;
  if (!parse_isa(env, &requested)) {
    TORCH_WARN(kIsaEnv, "=", env, " is not one of scalar, avx2, avx512, amx, auto; using ", isa_name(best));
    return best;
  }
  if (!isa_supported(requested)) {
    TORCH_WARN(kIsaEnv, "=", env, " is not supported by this CPU; using ", isa_name(best));
    return best;
  }
  return requested;
}

const KernelTable& active_kernels() {
  const KernelTable* table = g_active.load(std::memory_order_acquire);
  if (table == nullptr) {
    table = &kernels_for(isa_from_environment());
    g_active.store(table, std::memory_order_release);
  }
  return *table;
}

// ------------------------------------------------------------------------------------------------ checks

bool is_float_input(const at::Tensor& t) {
  const auto d = t.scalar_type();
  return d == at::kFloat || d == at::kBFloat16 || d == at::kHalf || d == at::kDouble;
}

//! `index` (e.g. "[2]" for a member of a tensor list) follows the argument name in the message.
void check_cpu(const at::Tensor& t, const char* op, const char* name, const char* index = "") {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, index, " must be a CPU tensor, got device ", t.device());
}

void check_float(const at::Tensor& t, const char* op, const char* name, const char* index = "") {
  TORCH_CHECK_TYPE(is_float_input(t), op, ": ", name, index,
                   " must be a floating-point tensor (float32, bfloat16 or float16), got dtype ", t.scalar_type());
}

//! A contiguous fp32/bf16/fp16 view of x (float64 is computed in fp32, as the reference does).
at::Tensor kernel_input(const at::Tensor& x) {
  return (x.scalar_type() == at::kDouble ? x.to(at::kFloat) : x).contiguous();
}

FloatKind float_kind(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return FloatKind::BF16;
    case at::kHalf: return FloatKind::F16;
    default: return FloatKind::F32;
  }
}

int64_t round_up4(int64_t v) { return (v + 3) / 4 * 4; }

//! Per-token quantization of a contiguous [M, K] float tensor into x_q [M, lda] (zero padded), scales and
//! optional row sums, rows split over threads.
void quantize_into(const KernelTable& kt, const at::Tensor& xc, int64_t M, int64_t K, int8_t* x_q, int64_t lda,
                   float* scale, int32_t* row_sum) {
  if (lda > K)
    for (int64_t m = 0; m < M; ++m) std::memset(x_q + m * lda + K, 0, size_t(lda - K));
  const FloatKind kind = float_kind(xc.scalar_type());
  const void* data = xc.data_ptr();
  at::parallel_for(0, M, std::max<int64_t>(1, kElementGrain / std::max<int64_t>(K, 1)), [&](int64_t r0, int64_t r1) {
    kt.quantize_rows(data, kind, K, r0, r1, x_q, lda, scale, row_sum);
  });
}

//! Ternary matmul over all of [M, N], split between threads by packed rows (decode) or by
//! (row block, 16-row packed tile) work items (prefill).
void run_ternary(const KernelTable& kt, const int8_t* x_q, int64_t lda, const int32_t* x_sum, int64_t K, int64_t M,
                 const uint8_t* packed, int64_t P, const OutputSpec& out) {
  if (M == 0 || P == 0) return;
  if (M <= kDecodeMaxRows) {
    at::parallel_for(0, P, kTernaryTileP, [&](int64_t p0, int64_t p1) {
      kt.ternary_gemm(x_q, lda, x_sum, K, 0, M, packed, P, p0, p1, out);
    });
    return;
  }
  const int64_t tiles = (P + kTernaryTileP - 1) / kTernaryTileP;
  const int64_t blocks = (M + kPrefillRowBlock - 1) / kPrefillRowBlock;
  at::parallel_for(0, blocks * tiles, 1, [&](int64_t w0, int64_t w1) {
    while (w0 < w1) {  // merge consecutive tiles of one row block into a single call
      const int64_t block = w0 / tiles, first = w0 % tiles;
      const int64_t last = std::min(tiles, first + (w1 - w0));
      const int64_t m0 = block * kPrefillRowBlock, m1 = std::min(M, m0 + kPrefillRowBlock);
      kt.ternary_gemm(x_q, lda, x_sum, K, m0, m1, packed, P, first * kTernaryTileP,
                      std::min(P, last * kTernaryTileP), out);
      w0 += last - first;
    }
  });
}

void run_int8(const KernelTable& kt, const int8_t* x_q, int64_t lda, int64_t K, int64_t M, const int8_t* w, int64_t N,
              const OutputSpec& out) {
  if (M == 0 || N == 0) return;
  if (M <= kDecodeMaxRows) {
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { kt.int8_gemm(x_q, lda, K, 0, M, w, n0, n1, out); });
    return;
  }
  const int64_t tiles = (N + kInt8TileN - 1) / kInt8TileN;
  const int64_t blocks = (M + kPrefillRowBlock - 1) / kPrefillRowBlock;
  at::parallel_for(0, blocks * tiles, 1, [&](int64_t w0, int64_t w1) {
    while (w0 < w1) {
      const int64_t block = w0 / tiles, first = w0 % tiles;
      const int64_t last = std::min(tiles, first + (w1 - w0));
      const int64_t m0 = block * kPrefillRowBlock, m1 = std::min(M, m0 + kPrefillRowBlock);
      kt.int8_gemm(x_q, lda, K, m0, m1, w, first * kInt8TileN, std::min(N, last * kInt8TileN), out);
      w0 += last - first;
    }
  });
}

std::vector<int64_t> leading_shape(const at::Tensor& x) {
  return std::vector<int64_t>(x.sizes().begin(), x.sizes().end() - 1);
}

//! Output tensor in the dtype the kernels write (fp32 for a float64 input, converted afterwards).
at::Tensor float_output(const at::Tensor& x, std::vector<int64_t> shape) {
  const auto dtype = x.scalar_type() == at::kDouble ? at::kFloat : x.scalar_type();
  return at::empty(shape, x.options().dtype(dtype));
}

at::Tensor finish_float_output(const at::Tensor& x, const at::Tensor& y) {
  return x.scalar_type() == at::kDouble ? y.to(at::kDouble) : y;
}

at::Tensor optional_bias(const c10::optional<at::Tensor>& bias, int64_t N, const char* op, const char* index = "") {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  check_cpu(*bias, op, "bias", index);
  check_float(*bias, op, "bias", index);
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, op, ": bias", index, " must have shape [", N, "], got ",
                    bias->sizes());
  return bias->to(at::kFloat).contiguous();
}

//! The single element of a float weight_scale tensor as fp32 (read in place: no ATen op on the hot path).
float scalar_weight_scale(const at::Tensor& s) {
  switch (s.scalar_type()) {
    case at::kFloat: return *s.const_data_ptr<float>();
    case at::kBFloat16: return static_cast<float>(*s.const_data_ptr<at::BFloat16>());
    case at::kHalf: return static_cast<float>(*s.const_data_ptr<at::Half>());
    case at::kDouble: return static_cast<float>(*s.const_data_ptr<double>());
    default: return s.to(at::kFloat).reshape({}).item<float>();
  }
}

//! A linear's quantized input and its output, with the epilogue filled in except for the weight scales.
struct LinearInput {
  at::Tensor y;                  //!< [..., N] in x.dtype (fp32 for a float64 input; see finish_float_output)
  int64_t M = 0;                 //!< tokens (product of the leading dimensions)
  int64_t lda = 0;               //!< row stride of x_q: K rounded up to 4, zero padded
  std::vector<int8_t> x_q;       //!< [M, lda]
  std::vector<float> x_scale;    //!< [M]
  std::vector<int32_t> x_sum;    //!< [M] sum of the codes (only when requested)
  OutputSpec spec;
};

//! Shape the output of x [..., K] times a weight with N rows and, unless it is empty, quantize x per token.
//! With quantize_if_empty, x is quantized even when N is 0 (a group whose first member is empty).
LinearInput prepare_linear(const KernelTable& kt, const at::Tensor& x, int64_t N, const at::Tensor& bias_f,
                           bool row_sums, bool quantize_if_empty = false) {
  LinearInput in;
  const int64_t K = x.size(-1);
  std::vector<int64_t> out_shape = leading_shape(x);
  in.M = 1;
  for (int64_t s : out_shape) in.M *= s;
  out_shape.push_back(N);
  in.y = float_output(x, out_shape);
  if (in.M == 0 || (N == 0 && !quantize_if_empty)) return in;
  in.lda = round_up4(K);
  in.x_q.resize(static_cast<size_t>(in.M * in.lda));
  in.x_scale.resize(static_cast<size_t>(in.M));
  if (row_sums) in.x_sum.resize(static_cast<size_t>(in.M));
  quantize_into(kt, kernel_input(x), in.M, K, in.x_q.data(), in.lda, in.x_scale.data(),
                row_sums ? in.x_sum.data() : nullptr);
  in.spec.out = in.y.data_ptr();
  in.spec.ldo = N;
  in.spec.out_kind = float_kind(in.y.scalar_type());
  in.spec.x_scale = in.x_scale.data();
  in.spec.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  return in;
}

// ------------------------------------------------------------------------------------------------ ops

std::tuple<at::Tensor, at::Tensor> quantize_activation(const at::Tensor& x) {
  constexpr const char* op = "bitnet::quantize_activation";
  check_cpu(x, op, "x");
  check_float(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension (the feature dimension)");
  const at::Tensor xc = kernel_input(x);
  const int64_t K = x.size(-1);
  int64_t M = 1;
  for (int64_t s : leading_shape(x)) M *= s;
  at::Tensor x_q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  std::vector<int64_t> scale_shape = leading_shape(x);
  scale_shape.push_back(1);
  at::Tensor scale = at::empty(scale_shape, x.options().dtype(at::kFloat));
  if (M > 0)
    quantize_into(active_kernels(), xc, M, K, x_q.data_ptr<int8_t>(), K, scale.data_ptr<float>(), nullptr);
  return {x_q, scale};
}

at::Tensor ternary_matmul(const at::Tensor& x_q, const at::Tensor& packed) {
  constexpr const char* op = "bitnet::ternary_matmul";
  check_cpu(x_q, op, "x_q");
  check_cpu(packed, op, "packed");
  TORCH_CHECK_TYPE(x_q.scalar_type() == at::kChar, op, ": x_q must be int8, got ", x_q.scalar_type());
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK_VALUE(x_q.dim() == 2, op, ": x_q must be 2-D [M, K], got shape ", x_q.sizes());
  TORCH_CHECK_VALUE(packed.dim() == 2, op, ": packed must be 2-D [N/4, K], got shape ", packed.sizes());
  const int64_t M = x_q.size(0), K = x_q.size(1), P = packed.size(0);
  TORCH_CHECK_VALUE(packed.size(1) == K, op, ": K of x_q (", K, ") and packed (", packed.size(1), ") differ");
  TORCH_CHECK_VALUE(K < kMaxTernaryK, op, ": K=", K, " exceeds the supported maximum ", kMaxTernaryK - 1);
  at::Tensor out = at::empty({M, 4 * P}, x_q.options().dtype(at::kInt));
  if (M == 0 || P == 0) return out;
  const KernelTable& kt = active_kernels();
  const at::Tensor pc = packed.contiguous();
  const int64_t lda = round_up4(K);
  at::Tensor xp = lda == K ? x_q.contiguous() : at::constant_pad_nd(x_q, {0, lda - K}, 0).contiguous();
  const int8_t* xd = xp.data_ptr<int8_t>();
  std::vector<int32_t> x_sum(static_cast<size_t>(M), 0);
  for (int64_t m = 0; m < M; ++m) {
    int32_t s = 0;
    for (int64_t k = 0; k < K; ++k) s += xd[m * lda + k];
    x_sum[size_t(m)] = s;
  }
  OutputSpec spec;
  spec.out = out.data_ptr<int32_t>();
  spec.ldo = 4 * P;
  spec.out_int32 = true;
  run_ternary(kt, xd, lda, x_sum.data(), K, M, pc.data_ptr<uint8_t>(), P, spec);
  return out;
}

//! One packed ternary weight of a (grouped) ternary linear: its rows, scale and where its output goes.
struct TernaryMember {
  at::Tensor packed;   //!< contiguous [P, K]
  at::Tensor bias_f;   //!< fp32 [N] or undefined
  at::Tensor y;        //!< [..., N]
  int64_t P = 0;
  float w_scale = 0.f;
  OutputSpec spec;
};

//! Checks of the float input [..., K] of a ternary linear; returns K.
int64_t check_ternary_input(const at::Tensor& x, const char* op) {
  check_cpu(x, op, "x");
  check_float(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension (the feature dimension)");
  const int64_t K = x.size(-1);
  TORCH_CHECK_VALUE(K < kMaxTernaryK, op, ": K=", K, " exceeds the supported maximum ", kMaxTernaryK - 1);
  return K;
}

//! Checks one packed weight (with its scale and bias) against K and prepares it. `index` ("" or "[g]")
//! follows the argument names in the error messages.
TernaryMember ternary_member(const char* op, int64_t K, const at::Tensor& packed, const at::Tensor& weight_scale,
                             const std::optional<at::Tensor>& bias, const char* index) {
  check_cpu(packed, op, "packed", index);
  check_cpu(weight_scale, op, "weight_scale", index);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, op, ": packed", index, " must be uint8, got ",
                   packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() == 2, op, ": packed", index, " must be 2-D [N/4, K], got shape ", packed.sizes());
  TORCH_CHECK_VALUE(packed.size(1) == K, op, ": K of x (", K, ") and packed", index, " (", packed.size(1),
                    ") differ");
  check_float(weight_scale, op, "weight_scale", index);
  TORCH_CHECK_VALUE(weight_scale.numel() == 1, op, ": weight_scale", index, " must hold one element, got shape ",
                    weight_scale.sizes());
  TernaryMember member;
  member.P = packed.size(0);
  member.packed = packed.contiguous();
  member.w_scale = scalar_weight_scale(weight_scale);
  member.bias_f = optional_bias(bias, 4 * member.P, op, index);
  return member;
}

//! x times every member's weight, x quantized once. Decode runs one parallel region over the packed-row
//! chunks of all members, so the threads stream the weights back to back (one fork/join, no tail of a
//! small matrix per member); prefill runs the members one after the other.
std::vector<at::Tensor> run_ternary_members(const at::Tensor& x, std::vector<TernaryMember>& members) {
  const KernelTable& kt = active_kernels();
  const int64_t K = x.size(-1);
  const size_t G = members.size();
  const bool any_rows = std::any_of(members.begin(), members.end(), [](const TernaryMember& m) { return m.P > 0; });
  // The first member's output comes with the quantized input; the others get theirs below.
  LinearInput in = prepare_linear(kt, x, 4 * members[0].P, members[0].bias_f, /*row_sums=*/true,
                                  /*quantize_if_empty=*/any_rows);
  std::vector<int64_t> out_shape = leading_shape(x);
  out_shape.push_back(0);
  for (size_t g = 0; g < G; ++g) {
    TernaryMember& mb = members[g];
    out_shape.back() = 4 * mb.P;
    mb.y = g == 0 ? in.y : float_output(x, out_shape);
    mb.spec = in.spec;
    mb.spec.out = mb.y.data_ptr();
    mb.spec.ldo = 4 * mb.P;
    mb.spec.w_scale = &mb.w_scale;
    mb.spec.bias = mb.bias_f.defined() ? mb.bias_f.data_ptr<float>() : nullptr;
  }
  if (in.M > 0 && any_rows) {
    if (in.M <= kDecodeMaxRows) {
      std::vector<int64_t> first_chunk(G + 1, 0);
      for (size_t g = 0; g < G; ++g)
        first_chunk[g + 1] = first_chunk[g] + (members[g].P + kTernaryTileP - 1) / kTernaryTileP;
      at::parallel_for(0, first_chunk[G], 1, [&](int64_t c0, int64_t c1) {
        size_t g = 0;
        while (c0 < c1) {
          while (first_chunk[g + 1] <= c0) ++g;
          const TernaryMember& mb = members[g];
          const int64_t last = std::min(c1, first_chunk[g + 1]);
          const int64_t p0 = (c0 - first_chunk[g]) * kTernaryTileP;
          const int64_t p1 = std::min(mb.P, (last - first_chunk[g]) * kTernaryTileP);
          kt.ternary_gemm(in.x_q.data(), in.lda, in.x_sum.data(), K, 0, in.M, mb.packed.data_ptr<uint8_t>(), mb.P,
                          p0, p1, mb.spec);
          c0 = last;
        }
      });
    } else {
      for (const TernaryMember& mb : members)
        run_ternary(kt, in.x_q.data(), in.lda, in.x_sum.data(), K, in.M, mb.packed.data_ptr<uint8_t>(), mb.P,
                    mb.spec);
    }
  }
  std::vector<at::Tensor> outputs;
  outputs.reserve(G);
  for (const TernaryMember& mb : members) outputs.push_back(finish_float_output(x, mb.y));
  return outputs;
}

at::Tensor ternary_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& weight_scale,
                          const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "bitnet::ternary_linear";
  const int64_t K = check_ternary_input(x, op);
  std::vector<TernaryMember> members;
  members.push_back(ternary_member(op, K, packed, weight_scale, bias, ""));
  return run_ternary_members(x, members)[0];
}

std::vector<at::Tensor> ternary_linear_group(const at::Tensor& x, at::TensorList packed, at::TensorList weight_scale,
                                             const c10::List<std::optional<at::Tensor>>& bias) {
  constexpr const char* op = "bitnet::ternary_linear_group";
  const int64_t K = check_ternary_input(x, op);
  const size_t G = packed.size();
  TORCH_CHECK_VALUE(G >= 1, op, ": packed must hold at least one weight");
  TORCH_CHECK_VALUE(weight_scale.size() == G, op, ": got ", G, " packed weights but ", weight_scale.size(),
                    " weight scales");
  TORCH_CHECK_VALUE(bias.size() == G, op, ": got ", G, " packed weights but ", bias.size(), " biases (use None)");
  std::vector<TernaryMember> members;
  members.reserve(G);
  for (size_t g = 0; g < G; ++g) {
    const std::string index = "[" + std::to_string(g) + "]";
    members.push_back(ternary_member(op, K, packed[g], weight_scale[g], bias.get(g), index.c_str()));
  }
  return run_ternary_members(x, members);
}

std::tuple<at::Tensor, at::Tensor> quantize_pack_weight(const at::Tensor& w) {
  constexpr const char* op = "bitnet::quantize_pack_weight";
  check_cpu(w, op, "w");
  check_float(w, op, "w");
  TORCH_CHECK_VALUE(w.dim() == 2, op, ": w must be 2-D [N, K], got shape ", w.sizes());
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK_VALUE(N % 4 == 0, op, ": out_features N=", N,
                    " is not a multiple of 4: the packed layout (SPEC §3) stores 4 output rows per byte");
  TORCH_CHECK_VALUE(w.numel() > 0, op, ": cannot quantize an empty weight (mean |W| is undefined)");
  // The absmean scale through ATen's own reduction, exactly as the reference computes it.
  at::Tensor scale = w.to(at::kFloat).abs().mean().clamp_min(1e-5);
  const float s = scale.item<float>();
  const at::Tensor wc = kernel_input(w);
  const int64_t P = N / 4;
  at::Tensor packed = at::zeros({P, K}, w.options().dtype(at::kByte));
  const KernelTable& kt = active_kernels();
  const FloatKind kind = float_kind(wc.scalar_type());
  const void* data = wc.data_ptr();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  // Threads own disjoint packed rows: rows p, P+p, 2P+p, 3P+p all go to thread of p.
  at::parallel_for(0, P, std::max<int64_t>(1, kElementGrain / (4 * K)), [&](int64_t p0, int64_t p1) {
    for (int64_t slot = 0; slot < 4; ++slot) kt.pack_rows(data, kind, K, s, P, slot * P + p0, slot * P + p1, dst);
  });
  return {packed, scale};
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                       const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "bitnet::int8_linear";
  check_cpu(x, op, "x");
  check_cpu(weight, op, "weight");
  check_cpu(weight_scale, op, "weight_scale");
  check_float(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension (the feature dimension)");
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kChar, op, ": weight must be int8, got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [N, K], got shape ", weight.sizes());
  const int64_t K = x.size(-1), N = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == K, op, ": K of x (", K, ") and weight (", weight.size(1), ") differ");
  TORCH_CHECK_VALUE(K < kMaxInt8K, op, ": K=", K, " exceeds the supported maximum ", kMaxInt8K - 1);
  check_float(weight_scale, op, "weight_scale");
  TORCH_CHECK_VALUE(weight_scale.numel() == N, op, ": weight_scale must hold one scale per output row (", N,
                    "), got shape ", weight_scale.sizes());
  const at::Tensor bias_f = optional_bias(bias, N, op);
  const KernelTable& kt = active_kernels();
  LinearInput in = prepare_linear(kt, x, N, bias_f, /*row_sums=*/false);
  if (in.M == 0 || N == 0) return finish_float_output(x, in.y);
  const at::Tensor ws = weight_scale.to(at::kFloat).contiguous().reshape({N});
  in.spec.w_scale = ws.data_ptr<float>();
  in.spec.w_scale_per_col = true;
  const at::Tensor wc = weight.contiguous();
  run_int8(kt, in.x_q.data(), in.lda, K, in.M, wc.data_ptr<int8_t>(), N, in.spec);
  return finish_float_output(x, in.y);
}

// ------------------------------------------------------------------------------------------------ utilities

std::string cpu_isa(c10::string_view request) {
  const std::string name(request);
  if (name == "auto") {
    g_active.store(&kernels_for(best_isa()), std::memory_order_release);
  } else if (!name.empty()) {
    Isa isa;
    TORCH_CHECK_VALUE(parse_isa(name, &isa), "bitnet::_cpu_isa: unknown instruction set '", name,
                      "' (expected '', 'auto', 'scalar', 'avx2', 'avx512' or 'amx')");
    TORCH_CHECK(isa_supported(isa), "bitnet::_cpu_isa: '", name, "' is not supported by this CPU (supported: ",
                c10::Join(", ", supported_isa_names()), ")");
    g_active.store(&kernels_for(isa), std::memory_order_release);
  }
  return active_kernels().name;
}

std::vector<std::string> cpu_isa_available() { return supported_isa_names(); }

}  // namespace
}  // namespace bitnet_cpu

TORCH_LIBRARY_IMPL(bitnet, CPU, m) {
  m.impl("quantize_activation", &bitnet_cpu::quantize_activation);
  m.impl("ternary_matmul", &bitnet_cpu::ternary_matmul);
  m.impl("ternary_linear", &bitnet_cpu::ternary_linear);
  m.impl("ternary_linear_group", &bitnet_cpu::ternary_linear_group);
  m.impl("quantize_pack_weight", &bitnet_cpu::quantize_pack_weight);
  m.impl("int8_linear", &bitnet_cpu::int8_linear);
}

TORCH_LIBRARY_IMPL(bitnet, CompositeExplicitAutograd, m) {
  m.impl("_cpu_isa", &bitnet_cpu::cpu_isa);
  m.impl("_cpu_isa_available", &bitnet_cpu::cpu_isa_available);
}
