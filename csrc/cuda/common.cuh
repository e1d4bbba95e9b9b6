// bitnet CUDA kernels: building blocks shared by every kernel (torch-free).
//
// Contents
//   * constants of the format (SPEC §1, §3) and of the numeric contract (see launch.h);
//   * the exact-rounding scalar math of the quantizers and of the epilogue, written once with
//     __fmul_rn / __fdiv_rn / __frcp_rn / __fadd_rn so that nvcc can never contract them into an FMA
//     (the same functions compile on the host with plain IEEE operations, for the host-side unit test);
//   * the 2-bit decoders of the packed layout and a dp4a that also runs on the host;
//   * typed loads/stores selected by ElemKind at run time (device only).
//
// Packed layout (SPEC §3): uint8 packed[P, K] with P = N/4; bits 2i..2i+1 of byte (p, k) hold
// W[i*P + p, k] + 1 (codes 0, 1, 2 for -1, 0, +1). A 32-bit word read from packed row p at column k
// (k % 4 == 0) therefore holds columns k..k+3 of the four rows p, P+p, 2P+p, 3P+p; slot i of every byte
// is extracted at once with (word >> 2i) & 0x03030303.
//
// Build (bitnet_torch/_build.py CUDA_FLAGS): nvcc -O3 --fmad=false -lineinfo, plus torch's defaults
// (-std=c++17 or later, -gencode per TORCH_CUDA_ARCH_LIST; sm_80+ for the tensor-core prefill kernel).
// Never --use_fast_math: it flushes denormals and replaces the IEEE division / reciprocal the quantizer
// needs. The explicit __*_rn intrinsics keep the results exact even without --fmad=false.
#pragma once

#include <cstdint>
#include <cmath>

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launch.h"

#if defined(__CUDACC__)
#define BITNET_HD __host__ __device__ __forceinline__
#define BITNET_DEVICE __device__ __forceinline__
#else
#define BITNET_HD inline
#endif

namespace bitnet_cuda {

//! SPEC §1: lower bound of the activation absmax and of the weight absmean.
constexpr float kScaleEps = 1e-5f;
//! SPEC §1: absmax maps to this int8 code; codes are clamped to [kActQmin, kActQmax].
constexpr float kActQmax = 127.0f;
constexpr float kActQmin = -128.0f;
//! SPEC §3: ternary values per packed byte.
constexpr int kValuesPerByte = 4;
//! Bit mask of the 2-bit code in slot 0 of each of the 4 bytes of a 32-bit word.
constexpr uint32_t kSlotMask = 0x03030303u;
//! Packed byte whose four codes all mean 0 (code 1 in every slot): the padding of weight tiles.
constexpr uint8_t kPackedZeroByte = 0x55;
constexpr int kWarpSize = 32;

// ---- exact-rounding scalar math (identical on host and device) ---------------------------------------

BITNET_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  volatile float r = a * b;  // volatile: the host compiler may not fuse this product into a later add
  return r;
#endif
}

BITNET_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

BITNET_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

BITNET_HD float rcp_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __frcp_rn(a);
#else
  return 1.0f / a;
#endif
}

BITNET_HD float round_half_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return std::nearbyint(v);  // default rounding mode: to nearest, ties to even
#endif
}

//! max(absmax, 1e-5): the clamped denominator of the activation scale. A NaN absmax stays NaN, as in
//! torch.clamp (so a token holding a NaN gets a NaN scale, never 1e-5 / 127).
BITNET_HD float clamp_absmax(float absmax) { return absmax < kScaleEps ? kScaleEps : absmax; }

//! max(a, b) of two magnitudes that propagates NaN, as torch.amax does (fmaxf drops a NaN operand).
BITNET_HD float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

//! The multiplier that maps a token to int8 codes: rn(rn(1 / absmax) * 127), as torch's `127 / absmax`.
BITNET_HD float activation_inverse_scale(float clamped_absmax) { return mul_rn(rcp_rn(clamped_absmax), kActQmax); }

//! The per-token scale returned to the caller: rn(absmax / 127).
BITNET_HD float activation_scale(float clamped_absmax) { return div_rn(clamped_absmax, kActQmax); }

//! int8 code of one activation value: clamp(rint(rn(x * inv)), -128, 127), and 0 when x * inv is NaN (what
//! torch's float -> int8 conversion gives): every code of a token holding a NaN (inv = NaN) or an infinity
//! (inv = 127 / inf = 0, inf * 0 = NaN, finite * 0 = 0) is 0, as in the reference.
BITNET_HD int8_t quantize_activation_value(float x, float inv) {
  const float product = mul_rn(x, inv);
  if (product != product) return 0;
  float q = round_half_even(product);
  q = q < kActQmin ? kActQmin : (q > kActQmax ? kActQmax : q);
  return static_cast<int8_t>(static_cast<int>(q));
}

//! Packed 2-bit code (0, 1, 2) of one weight value: clamp(rint(rn(w / scale)), -1, 1) + 1.
BITNET_HD uint32_t ternary_code(float w, float scale) {
  float q = round_half_even(div_rn(w, scale));
  q = q < -1.0f ? -1.0f : (q > 1.0f ? 1.0f : q);
  return static_cast<uint32_t>(static_cast<int>(q) + 1);
}

//! Linear epilogue of one output: rn(rn(float(acc) * rn(x_scale * w_scale)) + bias) (bias added if present).
BITNET_HD float epilogue_value(int32_t acc, float x_scale, float w_scale, bool has_bias, float bias) {
  const float y = mul_rn(static_cast<float>(acc), mul_rn(x_scale, w_scale));
  return has_bias ? add_rn(y, bias) : y;
}

// ---- 2-bit decoding and 4-way int8 dot products ------------------------------------------------------

//! Unsigned codes (w + 1, in {0, 1, 2}) of slot `slot` of the 4 bytes of `word`, one per byte.
BITNET_HD uint32_t ternary_slot_codes(uint32_t word, int slot) { return (word >> (2 * slot)) & kSlotMask; }

//! Signed int8 values {-1, 0, 1} of slot `slot` of the 4 bytes of `word`, one per byte (code - 1 without
//! borrows between bytes: (code | 0x80) - 1 stays in [0x7F, 0x81], and ^ 0x80 recentres it).
BITNET_HD uint32_t ternary_slot_values(uint32_t word, int slot) {
  return ((ternary_slot_codes(word, slot) | 0x80808080u) - 0x01010101u) ^ 0x80808080u;
}

//! c + sum of the 4 byte-wise products of a and b, all bytes read as signed int8 (CUDA's __dp4a).
//! The unsigned codes 0..2 are non-negative int8 values, so the same instruction serves them.
BITNET_HD int32_t dot4(uint32_t a, uint32_t b, int32_t c) {
#if defined(__CUDA_ARCH__)
  return __dp4a(static_cast<int>(a), static_cast<int>(b), c);
#else
  for (int i = 0; i < 4; ++i) {
    c += static_cast<int32_t>(static_cast<int8_t>(a >> (8 * i))) * static_cast<int32_t>(static_cast<int8_t>(b >> (8 * i)));
  }
  return c;
#endif
}

//! Ceil division for non-negative sizes.
BITNET_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

//! Bytes [k0, k0 + 16) of a row of `k` bytes read one by one; bytes at or past `k` read as `pad`.
//! Out of line on the device: it is the rare tail / unaligned path and would bloat every unrolled caller.
#if defined(__CUDACC__)
static __host__ __device__ __noinline__
#else
inline
#endif
uint4 load_chunk16_bytes(const uint8_t* row, int64_t k0, int64_t k, uint8_t pad) {
  uint32_t words[4];
  for (int j = 0; j < 4; ++j) {
    uint32_t word = 0;
    for (int b = 0; b < 4; ++b) {
      const int64_t col = k0 + 4 * j + b;
      word |= static_cast<uint32_t>(col < k ? row[col] : pad) << (8 * b);
    }
    words[j] = word;
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

//! Bytes [k0, k0 + 16) of a row of `k` bytes; bytes at or past `k` read as `pad`. `aligned` promises that
//! row + k0 is 16-byte aligned whenever k0 + 16 <= k (then one 16-byte load is used).
BITNET_HD uint4 load_chunk16(const uint8_t* row, int64_t k0, int64_t k, bool aligned, uint8_t pad) {
  if (aligned && k0 + 16 <= k) return *reinterpret_cast<const uint4*>(row + k0);
  return load_chunk16_bytes(row, k0, k, pad);
}

//! The four 32-bit words of a 16-byte chunk, lowest address first.
BITNET_HD uint32_t chunk_word(const uint4& v, int j) { return j == 0 ? v.x : (j == 1 ? v.y : (j == 2 ? v.z : v.w)); }

// ---- typed loads / stores (device) -----------------------------------------------------------------

#if defined(__CUDACC__)

//! Element i of a float buffer of kind `kind`, as fp32 (exact widening for bf16 / fp16).
BITNET_DEVICE float load_float(const void* base, ElemKind kind, int64_t i) {
  switch (kind) {
    case ElemKind::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    case ElemKind::kFloat16: return __half2float(static_cast<const __half*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

//! Store one linear output: raw accumulator (kInt32) or the fp32 value rounded to the output dtype.
BITNET_DEVICE void store_output(void* base, ElemKind kind, int64_t i, int32_t acc, float value) {
  switch (kind) {
    case ElemKind::kInt32: static_cast<int32_t*>(base)[i] = acc; break;
    case ElemKind::kBFloat16: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(value); break;
    case ElemKind::kFloat16: static_cast<__half*>(base)[i] = __float2half_rn(value); break;
    default: static_cast<float*>(base)[i] = value; break;
  }
}

//! Writes out[m, n] of a linear: the raw accumulator (int32 output) or the epilogue of launch.h with the
//! token scale `x_scale`, the weight scale (one element for ternary weights, element n for int8 rows) and the
//! optional bias. Out of line: it runs once per output, and inlining its dtype switches into every unrolled
//! store site multiplies compile time. (static: one private copy per translation unit.)
static __device__ __noinline__ void store_linear_output(const LinearOperands& op, int64_t m, int64_t n, int32_t acc,
                                                 float x_scale) {
  float y = 0.0f;
  if (op.out_kind != ElemKind::kInt32) {
    const int64_t scale_index = op.format == WeightFormat::kTernaryPacked ? 0 : n;
    const float w_scale = load_float(op.weight_scale, op.weight_scale_kind, scale_index);
    const bool has_bias = op.bias != nullptr;
    y = epilogue_value(acc, x_scale, w_scale, has_bias, has_bias ? load_float(op.bias, op.bias_kind, n) : 0.0f);
  }
  store_output(op.out, op.out_kind, m * op.ldo + n, acc, y);
}

//! Sum over the warp, result in every lane.
BITNET_DEVICE int32_t warp_sum(int32_t v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

//! NaN-propagating max over the warp, result in every lane (max is exact, so the order does not matter).
BITNET_DEVICE float warp_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

//! One warp quantizes the token x[first .. first + k) (element offsets) into codes[0..pad_to) (zeros
//! after k); returns its scale. Every lane must call it (warp shuffles).
BITNET_DEVICE float quantize_token_warp(const void* x, ElemKind kind, int64_t first, int64_t k, int8_t* codes,
                                        int64_t pad_to, int lane) {
  float absmax = 0.0f;
  for (int64_t i = lane; i < k; i += kWarpSize) absmax = nan_max(absmax, fabsf(load_float(x, kind, first + i)));
  const float clamped = clamp_absmax(warp_max(absmax));
  const float inv = activation_inverse_scale(clamped);
  for (int64_t i = lane; i < pad_to; i += kWarpSize) {
    codes[i] = i < k ? quantize_activation_value(load_float(x, kind, first + i), inv) : int8_t(0);
  }
  return activation_scale(clamped);
}

#endif  // __CUDACC__

}  // namespace bitnet_cuda
