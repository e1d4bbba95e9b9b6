// bitnet CUDA kernels: per-token activation quantization and weight ternarize-and-pack (torch-free).
//
// quantize_activation_kernel: one warp per token (grid-stride over tokens). Reads x [M, ldx] (fp32 / bf16 /
//   fp16, unit stride along K), writes int8 codes [M, ldq] (columns [K, pad_to) zero-filled, so the GEMM
//   can use 16-byte loads on a padded copy) and fp32 scales [M]. Numbers: launch.h.
// quantize_pack_weight_kernel: one thread per packed byte (p, k) (grid-stride); reads the four weights
//   w[i*P + p, k] (i = 0..3), divides by the device scalar `scale` (absmean, computed by the caller with
//   the same ATen reduction as the reference), rounds half-to-even, clamps to [-1, 1] and packs the codes
//   in the SPEC §3 order (slot i in bits 2i..2i+1).
#include "common.cuh"

namespace bitnet_cuda {
namespace {

constexpr int kQuantizeWarps = 8;
constexpr int kPackThreads = 256;
//! Grid-stride kernels launch at most this many blocks per SM (enough to saturate memory bandwidth).
constexpr int kBlocksPerSm = 8;

__global__ void __launch_bounds__(kQuantizeWarps* kWarpSize)
    quantize_activation_kernel(const void* x, ElemKind kind, int64_t ldx, int64_t m, int64_t k, int8_t* codes,
                               int64_t ldq, int64_t pad_to, float* scales) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps_in_grid = static_cast<int64_t>(gridDim.x) * kQuantizeWarps;
  // The loop bound is uniform across the warp, as quantize_token_warp's shuffles require.
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kQuantizeWarps + threadIdx.x / kWarpSize; row < m;
       row += warps_in_grid) {
    const float scale = quantize_token_warp(x, kind, row * ldx, k, codes + row * ldq, pad_to, lane);
    if (lane == 0) scales[row] = scale;
  }
}

__global__ void __launch_bounds__(kPackThreads)
    quantize_pack_weight_kernel(const void* w, ElemKind kind, int64_t packed_rows, int64_t k, const float* scale,
                                uint8_t* packed) {
  const float s = *scale;
  const int64_t total = packed_rows * k;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t p = idx / k;
    const int64_t col = idx - p * k;
    uint32_t byte = 0;
#pragma unroll
    for (int slot = 0; slot < kValuesPerByte; ++slot) {
      byte |= ternary_code(load_float(w, kind, (slot * packed_rows + p) * k + col), s) << (2 * slot);
    }
    packed[idx] = static_cast<uint8_t>(byte);
  }
}

int grid_size(int64_t work_blocks, const DeviceInfo& device) {
  const int64_t cap = static_cast<int64_t>(device.sm_count) * kBlocksPerSm;
  return static_cast<int>(work_blocks < cap ? work_blocks : cap);
}

}  // namespace

void launch_quantize_activation(const void* x, ElemKind x_kind, int64_t ldx, int64_t m, int64_t k, int8_t* codes,
                                int64_t ldq, int64_t pad_to, float* scales, const DeviceInfo& device,
                                cudaStream_t stream) {
  if (m == 0) return;
  const int grid = grid_size(ceil_div(m, kQuantizeWarps), device);
  quantize_activation_kernel<<<grid, kQuantizeWarps * kWarpSize, 0, stream>>>(x, x_kind, ldx, m, k, codes, ldq,
                                                                               pad_to, scales);
}

void launch_quantize_pack_weight(const void* w, ElemKind w_kind, int64_t n, int64_t k, const float* scale,
                                 uint8_t* packed, const DeviceInfo& device, cudaStream_t stream) {
  const int64_t packed_rows = n / kValuesPerByte;
  if (packed_rows == 0 || k == 0) return;
  const int grid = grid_size(ceil_div(packed_rows * k, kPackThreads), device);
  quantize_pack_weight_kernel<<<grid, kPackThreads, 0, stream>>>(w, w_kind, packed_rows, k, scale, packed);
}

}  // namespace bitnet_cuda
