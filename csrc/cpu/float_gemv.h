// bitnet CPU kernels: the bandwidth-bound float GEMV behind bitnet::float_linear (torch-free).
//
// out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), accumulated in fp32, for a few tokens (decode: M <= 8)
// against a large row-major weight [N, K] in bf16 or fp32 (the float lm_head). The weight is streamed once
// per call; x stays in L1. Every product is exact in fp32 (bf16 x bf16 fits in 16 mantissa bits; fp32 x
// bf16 goes through an FMA), so the paths differ from each other and from F.linear only in the order of
// the fp32 additions.
//
// Paths (chosen at run time from cpuid, overridable for tests through float_gemv_set_isa):
//   * avx512_bf16: vdpbf16ps on bf16 x and bf16 w (used only when x itself is bf16: rounding an fp32 x to
//     bf16 would change the numbers); otherwise the avx512 path below.
//   * avx512: weight widened to fp32 (bf16: zero-extend + shift by 16), FMA with fp32 x, 16 lanes.
//   * avx2: the same with 8 lanes (needs AVX2 + FMA).
//   * scalar: plain fp32 loops.
// Each call handles output rows [n0, n1) for all M tokens, so the caller splits rows across threads.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace bitnet_cpu {

enum class GemvIsa : int { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3 };

//! The operands of one float GEMV call.
struct FloatGemvArgs {
  const float* x_f32 = nullptr;      //!< [M, K] fp32 copy of x, row-major (always set)
  const uint16_t* x_bf16 = nullptr;  //!< [M, K] bf16 bits of x when x is bf16 (enables vdpbf16ps), else null
  int64_t M = 0;
  int64_t K = 0;
  const void* w = nullptr;           //!< [N, K] row-major weight
  bool w_bf16 = false;               //!< true: w holds bf16 bits; false: fp32
  const float* bias = nullptr;       //!< [N] fp32 or null
  float* out = nullptr;              //!< [M, ldo] fp32
  int64_t ldo = 0;
};

//! "scalar", "avx2", "avx512" or "avx512_bf16".
const char* gemv_isa_name(GemvIsa isa);
//! True when this CPU and OS can run the path.
bool gemv_isa_supported(GemvIsa isa);
//! Names of the supported paths, slowest first.
std::vector<std::string> gemv_supported_isa_names();
//! The path in use: the fastest supported one unless float_gemv_set_isa chose another.
GemvIsa float_gemv_isa();
//! Select a path by name ("auto" = fastest). Returns false (and changes nothing) for an unknown or
//! unsupported name.
bool float_gemv_set_isa(const std::string& name);

//! Compute rows [n0, n1) of out for all M tokens with the active path.
void float_gemv_rows(const FloatGemvArgs& args, int64_t n0, int64_t n1);

}  // namespace bitnet_cpu
