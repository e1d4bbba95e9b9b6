// bitnet CPU kernels: portable scalar building blocks shared by every ISA file (torch-free).
//
// Contents: bit-exact float <-> bf16 / fp16 conversions (the same round-to-nearest-even as c10::BFloat16
// and c10::Half), the per-token activation quantizer for one row, the ternarize-and-pack of one weight
// row, and the epilogue for one output element. The SIMD files use these for tails and as the
// definition their vector code must reproduce; see kernel_api.h for the numeric contract.
// This header must be compiled with -ffp-contract=off (the epilogue multiply and add must stay separate).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernel_api.h"

namespace bitnet_cpu {

//! SPEC §1: lower bound of the activation absmax and of the weight absmean.
constexpr float kScaleEps = 1e-5f;
//! SPEC §1: absmax maps to this int8 code.
constexpr float kActQmax = 127.0f;
constexpr float kActQmin = -128.0f;

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float bf16_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

//! Round-to-nearest-even fp32 -> bf16 (NaN -> canonical quiet NaN), as c10::BFloat16. Branch-free (a select for
//! NaN), so loops over it vectorise (the decode engine's element-wise steps round every value).
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t rounded = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return f != f ? uint16_t(0x7FC0) : rounded;
}

//! IEEE half -> fp32, exact (as c10::detail::fp16_ieee_to_fp32_value).
inline float f16_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result = sign | (two_w < (1u << 27) ? float_bits(denormalized) : float_bits(normalized));
  return bits_float(result);
}

//! fp32 -> IEEE half with round-to-nearest-even (as c10::detail::fp16_ieee_from_fp32_value).
inline uint16_t float_to_f16(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

inline float load_float(const void* base, FloatKind kind, int64_t i) {
  switch (kind) {
    case FloatKind::BF16: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    case FloatKind::F16: return f16_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

//! max(absmax, 1e-5) as torch.clamp(min=) computes it: a NaN absmax stays NaN (never replaced by 1e-5).
inline float clamp_absmax(float absmax) { return absmax < kScaleEps ? kScaleEps : absmax; }

//! The activation quantizer's reciprocal: torch evaluates `127 / absmax` as reciprocal(absmax) * 127
//! (NaN for a NaN absmax, 0 for an infinite one).
inline float activation_inverse_scale(float absmax) { return (1.0f / clamp_absmax(absmax)) * kActQmax; }

inline float activation_scale(float absmax) { return clamp_absmax(absmax) / kActQmax; }

//! The NaN-propagating maximum of two magnitudes |a|, |b| (non-negative or NaN): for such floats the order
//! of their bit patterns as integers is the float order, and every NaN sorts above +inf. So the maximum of
//! the bit patterns is max(a, b) when both are numbers and a NaN when either is one, as torch.amax.
inline float magnitude_max(float a, float b) { return float_bits(a) > float_bits(b) ? a : b; }

//! Whether a row's absmax (a magnitude or NaN) is non-finite: the row holds a NaN or an infinity, and then
//! every one of its codes is 0 (see kernel_api.h).
inline bool nonfinite_absmax(float absmax) { return float_bits(absmax) >= 0x7F800000u; }

//! round-half-even(v) clamped to [-128, 127] (clamping before rounding is equivalent for integer bounds);
//! NaN gives 0, what torch's float -> int8 conversion gives (x86, ARM and CUDA alike).
inline int8_t quantize_code(float v) {
  if (v != v) return 0;
  v = v < kActQmin ? kActQmin : v;
  v = v > kActQmax ? kActQmax : v;
  return int8_t(std::nearbyint(v));
}

//! Codes 0 and the scale of a row whose absmax is non-finite (NaN -> NaN scale, inf -> inf). Returns 0, the
//! sum of the codes.
inline int32_t quantize_nonfinite_row(int64_t K, int8_t* q, float absmax, float* scale) {
  std::memset(q, 0, size_t(K));
  *scale = activation_scale(absmax);
  return 0;
}

//! Quantize one row of K floats (scalar reference path). Returns sum of the codes.
inline int32_t quantize_row_scalar(const void* x, FloatKind kind, int64_t K, int8_t* q, float* scale) {
  float absmax = 0.0f;
  for (int64_t k = 0; k < K; ++k) absmax = magnitude_max(absmax, std::fabs(load_float(x, kind, k)));
  const float inv = activation_inverse_scale(absmax);
  int32_t sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int8_t c = quantize_code(load_float(x, kind, k) * inv);
    q[k] = c;
    sum += c;
  }
  *scale = activation_scale(absmax);
  return sum;
}

//! Ternary code w + 1 of one weight value for the absmean scale s: clamp(round(w / s), -1, 1) + 1.
inline uint8_t ternary_code(float w, float s) {
  float v = std::nearbyint(w / s);
  v = v < -1.0f ? -1.0f : v;
  v = v > 1.0f ? 1.0f : v;
  return uint8_t(int(v) + 1);
}

//! Ternarize and pack rows [r0, r1) (scalar; also the pack path of the SIMD tables: packing runs once).
inline void pack_rows_scalar(const void* w, FloatKind kind, int64_t K, float scale, int64_t P, int64_t r0,
                             int64_t r1, uint8_t* packed) {
  for (int64_t r = r0; r < r1; ++r) {
    const int shift = int(2 * (r / P));
    uint8_t* dst = packed + (r % P) * K;
    const int64_t base = r * K;
    switch (kind) {
      case FloatKind::BF16: {
        const uint16_t* src = static_cast<const uint16_t*>(w) + base;
        for (int64_t k = 0; k < K; ++k) dst[k] |= uint8_t(ternary_code(bf16_to_float(src[k]), scale) << shift);
        break;
      }
      case FloatKind::F16: {
        const uint16_t* src = static_cast<const uint16_t*>(w) + base;
        for (int64_t k = 0; k < K; ++k) dst[k] |= uint8_t(ternary_code(f16_to_float(src[k]), scale) << shift);
        break;
      }
      default: {
        const float* src = static_cast<const float*>(w) + base;
        for (int64_t k = 0; k < K; ++k) dst[k] |= uint8_t(ternary_code(src[k], scale) << shift);
      }
    }
  }
}

//! The fused epilogue for one element: raw int32, or float(acc) * (x_scale * w_scale) + bias, rounded.
inline void store_output(const OutputSpec& o, int64_t m, int64_t n, int32_t acc) {
  if (o.out_int32) {
    static_cast<int32_t*>(o.out)[m * o.ldo + n] = acc;
    return;
  }
  const float s = o.x_scale[m] * (o.w_scale_per_col ? o.w_scale[n] : o.w_scale[0]);
  float y = float(acc) * s;
  if (o.bias != nullptr) y = y + o.bias[n];
  const int64_t i = m * o.ldo + n;
  switch (o.out_kind) {
    case FloatKind::BF16: static_cast<uint16_t*>(o.out)[i] = float_to_bf16(y); break;
    case FloatKind::F16: static_cast<uint16_t*>(o.out)[i] = float_to_f16(y); break;
    default: static_cast<float*>(o.out)[i] = y;
  }
}

}  // namespace bitnet_cpu
