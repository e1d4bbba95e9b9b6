// bitnet CUDA kernels: launcher of the decode linear (gemv.cuh), torch-free.
#include <atomic>

#include "gemv.cuh"

namespace bitnet_cuda {
namespace {

//! Kernels' default dynamic shared memory limit; beyond it a kernel must opt in.
constexpr int64_t kDefaultSmemBytes = 48 * 1024;
//! Devices tracked by the opt-in cache below (more devices simply opt in on every launch).
constexpr int kMaxTrackedDevices = 64;

//! Opt linear_gemv_kernel<Format, Tile> in to the device's whole shared memory once per device, so that later
//! launches (in particular during CUDA-graph capture, after the usual warm-up) make no attribute call at all.
//! Templated on the kernel's parameters, not on its type: every instantiation needs its own flag.
template <WeightFormat Format, int Tile>
void opt_in_shared_memory(const DeviceInfo& device) {
  static std::atomic<bool> done[kMaxTrackedDevices] = {};
  auto kernel = linear_gemv_kernel<Format, Tile>;
  int index = 0;
  cudaGetDevice(&index);
  if (index < kMaxTrackedDevices && done[index].load(std::memory_order_acquire)) return;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, device.max_smem_per_block) ==
          cudaSuccess &&
      index < kMaxTrackedDevices) {
    done[index].store(true, std::memory_order_release);
  }
}

template <WeightFormat Format, int Tile>
void launch_tile(const Activations& a, const LinearOperands& op, const GemvPlan& plan, const DeviceInfo& device,
                 cudaStream_t stream) {
  const int64_t groups = gemv_groups(Format, op.n);
  const int64_t wanted = ceil_div(groups, kGemvWarps);
  const int64_t cap = static_cast<int64_t>(device.sm_count) * kGemvBlocksPerSm;
  const dim3 grid(static_cast<unsigned>(wanted < cap ? wanted : cap), static_cast<unsigned>(plan.token_tiles));
  auto kernel = linear_gemv_kernel<Format, Tile>;
  if (plan.smem_bytes > kDefaultSmemBytes) opt_in_shared_memory<Format, Tile>(device);
  kernel<<<grid, kGemvWarps * kWarpSize, static_cast<size_t>(plan.smem_bytes), stream>>>(a, op,
                                                                                      gemv_padded_k(a.k));
}

template <WeightFormat Format>
void launch_format(const Activations& a, const LinearOperands& op, const GemvPlan& plan, const DeviceInfo& device,
                   cudaStream_t stream) {
  switch (plan.tile) {
    case 1: launch_tile<Format, 1>(a, op, plan, device, stream); break;
    case 2: launch_tile<Format, 2>(a, op, plan, device, stream); break;
    case 4: launch_tile<Format, 4>(a, op, plan, device, stream); break;
    default: launch_tile<Format, kGemvMaxTile>(a, op, plan, device, stream); break;
  }
}

}  // namespace

bool decode_supported(int64_t m, int64_t k, const DeviceInfo& device) {
  return plan_gemv(m, k, device.max_smem_per_block).ok;
}

void launch_linear_gemv(const Activations& a, const LinearOperands& op, const DeviceInfo& device,
                        cudaStream_t stream) {
  const GemvPlan plan = plan_gemv(a.m, a.k, device.max_smem_per_block);
  if (!plan.ok || gemv_groups(op.format, op.n) == 0) return;  // the caller checks decode_supported first
  if (op.format == WeightFormat::kTernaryPacked) {
    launch_format<WeightFormat::kTernaryPacked>(a, op, plan, device, stream);
  } else {
    launch_format<WeightFormat::kInt8Rows>(a, op, plan, device, stream);
  }
}

}  // namespace bitnet_cuda
