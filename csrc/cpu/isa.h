// bitnet CPU kernels: which instruction sets this CPU (and OS) supports, and the kernel table for each.
//
// Detection reads cpuid and xgetbv at run time; nothing about the ISA is assumed at compile time. The
// tables are ordered: Scalar < Avx2 (AVX2 + F16C) < Avx512 (AVX-512 F/BW/VL/DQ + VNNI + F16C) < Amx
// (Avx512 whose prefill runs on AMX-INT8 tiles; needs the kernel to grant the tile state, asked for once).
#pragma once

#include <string>
#include <vector>

#include "kernel_api.h"

namespace bitnet_cpu {

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2, Amx = 3 };

//! "scalar", "avx2", "avx512" or "amx".
const char* isa_name(Isa isa);
//! Parse one of the names above; false for anything else.
bool parse_isa(const std::string& name, Isa* isa);
//! True when this CPU and OS can run the ISA's kernels and the library was built with them.
bool isa_supported(Isa isa);
//! The fastest supported ISA.
Isa best_isa();
//! Names of every supported ISA, slowest first.
std::vector<std::string> supported_isa_names();
//! The kernel table of a supported ISA.
const KernelTable& kernels_for(Isa isa);

}  // namespace bitnet_cpu
