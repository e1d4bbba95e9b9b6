// bitnet CUDA kernels: the torch-free host interface (raw pointers, sizes, a CUDA stream).
//
// The ATen adapter (bindings.cpp) validates tensors, allocates outputs and calls these launchers; the
// launchers (quantize.cu, gemv.cu, gemm.cu) pick a kernel and launch it on the given stream. Nothing
// here synchronises the host or allocates memory, so every launcher is CUDA-graph capturable.
//
// Numeric contract (identical to bitnet_torch/_reference_ops.py evaluated on the CPU, bit for bit):
//   activation quantization of one token x[0..K):
//     absmax = max(max_k |x_k|, 1e-5f)
//     inv    = rn(rn(1 / absmax) * 127)            (torch evaluates `127 / absmax` as reciprocal * 127)
//     code_k = clamp(rint(rn(x_k * inv)), -128, 127)  (rint: round half to even)
//     scale  = rn(absmax / 127)
//     non-finite tokens (as the reference: torch.amax / torch.clamp keep NaN, float -> int8 maps NaN to 0):
//     a NaN anywhere gives absmax = scale = NaN and every code 0; +-inf (no NaN) gives absmax = scale = +inf,
//     inv = 0 and every code 0 (inf * 0 = NaN -> 0). The linear outputs of such a token are then NaN.
//   linear epilogue of one output:  y = rn(rn(float(acc) * rn(x_scale * w_scale)) + float(bias)),
//     then rounded to the output dtype (round to nearest even); acc is the exact int32 dot product.
//   weight packing: code = clamp(rint(rn(w / scale)), -1, 1) + 1, SPEC §3 layout (see common.cuh).
// No multiply-add is ever contracted into an FMA (the kernels use __fmul_rn / __fadd_rn explicitly).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace bitnet_cuda {

//! Element type of a float or int32 buffer handed to a kernel (selected at run time, not by template).
enum class ElemKind : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kInt32 = 3 };

//! Storage format of the weight operand of a linear.
enum class WeightFormat : int {
  kTernaryPacked = 0,  //!< uint8 [N/4, K], SPEC §3: byte (p, k) holds column k of rows p, P+p, 2P+p, 3P+p.
  kInt8Rows = 1,       //!< int8 [N, K], one row per output feature (the int8 lm_head).
};

//! What the launchers need to know about the current device (read once by the ATen adapter).
struct DeviceInfo {
  int sm_count = 1;
  int max_smem_per_block = 48 * 1024;  //!< opt-in dynamic shared memory limit per block, bytes
  int cc_major = 8;
};

//! Activations of a linear: float values quantized by the kernel, or int8 codes already quantized.
struct Activations {
  const void* x = nullptr;       //!< float [M, ldx] (row-major, unit stride in K), or nullptr
  ElemKind x_kind = ElemKind::kFloat32;
  int64_t ldx = 0;
  const int8_t* codes = nullptr;  //!< int8 [M, ldq] when x == nullptr
  int64_t ldq = 0;
  bool codes_aligned16 = false;   //!< codes base pointer is 16-byte aligned
  const float* scales = nullptr;  //!< fp32 [M] per-token scales of `codes` (needed for a float output)
  int64_t m = 0;
  int64_t k = 0;
};

//! Weight, scale, bias and output of a linear: out[m, n] = epilogue(sum_k a[m, k] * w[n, k]).
struct LinearOperands {
  const uint8_t* weight = nullptr;  //!< see WeightFormat; rows of K bytes, contiguous
  WeightFormat format = WeightFormat::kTernaryPacked;
  bool weight_aligned16 = false;   //!< weight base pointer is 16-byte aligned
  int64_t n = 0;                   //!< output features (a multiple of 4 for kTernaryPacked)
  const void* weight_scale = nullptr;  //!< one element (ternary) or [N] (int8 rows); nullptr for int32 out
  ElemKind weight_scale_kind = ElemKind::kFloat32;
  const void* bias = nullptr;      //!< [N] or nullptr
  ElemKind bias_kind = ElemKind::kFloat32;
  void* out = nullptr;             //!< [M, ldo]
  ElemKind out_kind = ElemKind::kInt32;  //!< kInt32: raw accumulators (no scale, no bias)
  int64_t ldo = 0;
};

//! Per-token quantization of float x [M, ldx] into int8 codes [M, ldq] and fp32 scales [M].
//! Columns [K, pad_to) of each code row are zero-filled (pad_to >= K; pass K for no padding).
void launch_quantize_activation(const void* x, ElemKind x_kind, int64_t ldx, int64_t m, int64_t k, int8_t* codes,
                                int64_t ldq, int64_t pad_to, float* scales, const DeviceInfo& device,
                                cudaStream_t stream);

//! Ternarize float w [N, K] with the fp32 device scalar `scale` (absmean, computed by the caller) and pack it
//! into uint8 [N/4, K] (SPEC §3). N must be a multiple of 4.
void launch_quantize_pack_weight(const void* w, ElemKind w_kind, int64_t n, int64_t k, const float* scale,
                                 uint8_t* packed, const DeviceInfo& device, cudaStream_t stream);

//! Whether the decode (GEMV, few tokens) kernel handles this problem; otherwise use launch_linear_gemm.
bool decode_supported(int64_t m, int64_t k, const DeviceInfo& device);

//! Decode path: one launch; float activations are quantized inside the kernel (fused).
void launch_linear_gemv(const Activations& a, const LinearOperands& op, const DeviceInfo& device,
                        cudaStream_t stream);

//! Whether the tensor-core (mma.sync int8) prefill kernel can run on this device (sm_80+).
bool gemm_supported(const DeviceInfo& device);

//! Prefill path: int8 tensor-core GEMM. `a` must hold int8 codes (quantize first) and, for a float
//! output, their scales.
void launch_linear_gemm(const Activations& a, const LinearOperands& op, const DeviceInfo& device,
                        cudaStream_t stream);

}  // namespace bitnet_cuda
