// bitnet CPU kernels: run-time instruction-set detection (cpuid + xgetbv), torch-free. See isa.h.
#include "isa.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <cstdint>

namespace bitnet_cpu {
namespace {

struct CpuFeatures {
  bool avx2 = false;
  bool avx512 = false;
  bool amx = false;
};

#if defined(__x86_64__) || defined(_M_X64)
uint64_t read_xcr0() {
  uint32_t eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

//! Linux hands out the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA);
//! then XCR0 must show the tile config and data components (bits 17, 18).
bool request_tile_state() {
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
  return (read_xcr0() & (uint64_t(3) << 17)) == (uint64_t(3) << 17);
#else
  return false;
#endif
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return f;
  const bool osxsave = ecx & (1u << 27), avx = ecx & (1u << 28), f16c = ecx & (1u << 29);
  if (!osxsave || !avx || !f16c) return f;
  const uint64_t xcr0 = read_xcr0();
  const bool os_ymm = (xcr0 & 0x6) == 0x6;     // SSE + AVX state
  const bool os_zmm = (xcr0 & 0xE6) == 0xE6;   // + opmask, ZMM_Hi256, Hi16_ZMM
  if (!os_ymm) return f;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return f;
  const bool avx2 = ebx & (1u << 5), bmi1 = ebx & (1u << 3), bmi2 = ebx & (1u << 8);
  f.avx2 = avx2 && bmi1 && bmi2;
  const bool avx512f = ebx & (1u << 16), avx512dq = ebx & (1u << 17), avx512bw = ebx & (1u << 30),
             avx512vl = ebx & (1u << 31), avx512vnni = ecx & (1u << 11);
  f.avx512 = f.avx2 && os_zmm && avx512f && avx512dq && avx512bw && avx512vl && avx512vnni;
  const bool amx_tile = edx & (1u << 24), amx_int8 = edx & (1u << 25);
  f.amx = f.avx512 && amx_tile && amx_int8 && request_tile_state();
  return f;
}
#else
CpuFeatures detect() { return {}; }
#endif

const CpuFeatures& features() {
  static const CpuFeatures f = detect();
  return f;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Amx: return "amx";
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

bool parse_isa(const std::string& name, Isa* isa) {
  for (Isa candidate : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Amx})
    if (name == isa_name(candidate)) {
      *isa = candidate;
      return true;
    }
  return false;
}

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::Amx: return features().amx && amx_kernels() != nullptr;
    case Isa::Avx512: return features().avx512 && avx512_kernels() != nullptr;
    case Isa::Avx2: return features().avx2 && avx2_kernels() != nullptr;
    default: return true;
  }
}

Isa best_isa() {
  if (isa_supported(Isa::Amx)) return Isa::Amx;
  if (isa_supported(Isa::Avx512)) return Isa::Avx512;
  if (isa_supported(Isa::Avx2)) return Isa::Avx2;
  return Isa::Scalar;
}

std::vector<std::string> supported_isa_names() {
  std::vector<std::string> names;
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Amx})
    if (isa_supported(isa)) names.emplace_back(isa_name(isa));
  return names;
}

const KernelTable& kernels_for(Isa isa) {
  switch (isa) {
    case Isa::Amx: return *amx_kernels();
    case Isa::Avx512: return *avx512_kernels();
    case Isa::Avx2: return *avx2_kernels();
    default: return scalar_kernels();
  }
}

}  // namespace bitnet_cpu
