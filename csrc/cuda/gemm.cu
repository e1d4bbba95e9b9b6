// bitnet CUDA kernels: launcher of the prefill tensor-core linear (gemm.cuh), torch-free.
#include "gemm.cuh"

namespace bitnet_cuda {

//! mma.sync m16n8k32 on int8 exists from sm_80 (Ampere) on.
constexpr int kGemmMinCcMajor = 8;

bool gemm_supported(const DeviceInfo& device) { return device.cc_major >= kGemmMinCcMajor; }

void launch_linear_gemm(const Activations& a, const LinearOperands& op, const DeviceInfo& device,
                        cudaStream_t stream) {
  (void)device;
  const int64_t column_tiles = gemm_column_tiles(op.format, op.n);
  const int64_t row_tiles = ceil_div(a.m, kTileM);
  if (column_tiles == 0 || row_tiles == 0) return;
  const dim3 grid(static_cast<unsigned>(column_tiles), static_cast<unsigned>(row_tiles));
  if (op.format == WeightFormat::kTernaryPacked) {
    linear_gemm_kernel<WeightFormat::kTernaryPacked><<<grid, kGemmThreads, 0, stream>>>(a, op);
  } else {
    linear_gemm_kernel<WeightFormat::kInt8Rows><<<grid, kGemmThreads, 0, stream>>>(a, op);
  }
}

}  // namespace bitnet_cuda
