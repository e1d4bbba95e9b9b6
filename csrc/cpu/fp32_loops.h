// Plain fp32 loops shared by kernels whose results must agree bit for bit (bitnet::rms_norm and the decode
// engine's norms call the same sum of squares). Torch-free.
#pragma once

#include <cstdint>

// Compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time from what the CPU reports (GCC function
// multi-versioning); elsewhere one portable version.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BITNET_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define BITNET_ISA_CLONES
#endif

namespace bitnet_cpu {

//! sum_i v[i]^2 -- the fp32 squares accumulated in double (lane-parallel partial sums), rounded once to fp32: the
//! one definition, in fp32_loops.cpp. An fp32 accumulation in lane order differed from torch's fp32 mean by up
//! to 3 units in the last place of an RMSNorm output (hypothesis: 1838 values of magnitude ~80); in double the
//! difference is only torch's own rounding.
float sum_squares(const float* v, int64_t n);

}  // namespace bitnet_cpu
