// bitnet CUDA kernels: the decode (few tokens, M <= 16) linear as one fused launch (torch-free).
//
// Grid: x = blocks over output-row groups (grid-stride), y = token tiles of `TILE` tokens.
// Block: kGemvWarps warps.
//   1. Prologue: the block quantizes its TILE tokens (float x) -- or copies their int8 codes -- into shared
//      memory, rows padded with zeros to k_pad = roundup(K, 16); per-token scales go to shared memory too.
//      Every block repeats this small amount of work, so quantization needs no second launch.
//   2. Each warp takes one output-row group at a time: one packed row p (ternary: outputs p, P+p, 2P+p,
//      3P+p) or four consecutive int8 rows (4g .. 4g+3). Lane l streams 16-byte weight chunks l, l+32, ...
//      of the group's K bytes exactly once, decodes them in registers and accumulates with dp4a against
//      the token codes in shared memory.
//        ternary: unsigned codes u = w + 1 in {0, 1, 2}: acc_i = sum u_i x - sum x (one extra dp4a per
//                 word computes sum x, shared by the four rows);
//        int8:    signed weights, acc_i = sum w_i x.
//   3. Warp reduction (xor butterfly), then lanes store the 4 x TILE outputs with the epilogue of launch.h.
// Any K (tails read byte-wise with padding), any N (ternary: N % 4 == 0, checked by the caller).
#pragma once

#include "common.cuh"

namespace bitnet_cuda {

constexpr int kGemvWarps = 8;
//! Output rows one warp produces per group (one packed row holds 4 ternary rows).
constexpr int kGemvRowsPerGroup = 4;
constexpr int kChunkBytes = 16;
//! Problems with more tokens than this go to the tensor-core GEMM.
constexpr int kDecodeMaxTokens = 16;
//! Largest token tile of one block (larger M uses several tiles along grid y).
constexpr int kGemvMaxTile = 8;
//! Grid-stride cap: blocks per SM.
constexpr int kGemvBlocksPerSm = 4;

//! K rounded up to whole 16-byte chunks: the row length of the token codes in shared memory.
BITNET_HD int64_t gemv_padded_k(int64_t k) { return ceil_div(k, kChunkBytes) * kChunkBytes; }

//! Dynamic shared memory of one block: TILE rows of codes plus TILE fp32 scales.
BITNET_HD int64_t gemv_smem_bytes(int tile, int64_t k) {
  return tile * gemv_padded_k(k) + tile * static_cast<int64_t>(sizeof(float));
}

//! How the decode kernel covers M tokens: `tile` tokens per block (1, 2, 4 or 8), `token_tiles` along y.
struct GemvPlan {
  bool ok = false;  //!< false: too many tokens, or a row of K codes does not fit in shared memory
  int tile = 0;
  int64_t token_tiles = 0;
  int64_t smem_bytes = 0;
};

BITNET_HD GemvPlan plan_gemv(int64_t m, int64_t k, int64_t max_smem_bytes) {
  GemvPlan plan;
  if (m < 1 || m > kDecodeMaxTokens) return plan;
  int tile = 1;
  while (tile < m && tile < kGemvMaxTile) tile *= 2;
  while (tile > 1 && gemv_smem_bytes(tile, k) > max_smem_bytes) tile /= 2;
  if (gemv_smem_bytes(tile, k) > max_smem_bytes) return plan;
  plan.ok = true;
  plan.tile = tile;
  plan.token_tiles = ceil_div(m, tile);
  plan.smem_bytes = gemv_smem_bytes(tile, k);
  return plan;
}

//! Number of output-row groups (one warp step each).
BITNET_HD int64_t gemv_groups(WeightFormat format, int64_t n) {
  return format == WeightFormat::kTernaryPacked ? n / kValuesPerByte : ceil_div(n, kGemvRowsPerGroup);
}

//! Output feature of row `i` (0..3) of group `g`.
BITNET_HD int64_t gemv_output_row(WeightFormat format, int64_t n, int64_t g, int i) {
  return format == WeightFormat::kTernaryPacked ? i * (n / kValuesPerByte) + g : g * kGemvRowsPerGroup + i;
}

//! One lane's work on one 16-byte chunk: `w` holds the chunk of the packed row (w[0], ternary) or of the four
//! int8 rows; `x` the same 16 columns of each token. Ternary accumulators hold sum u x; `xsum` sum x.
template <WeightFormat Format, int Tile>
BITNET_HD void gemv_accumulate_chunk(const uint4 (&w)[kGemvRowsPerGroup], const uint4 (&x)[Tile],
                                     int32_t (&acc)[kGemvRowsPerGroup][Tile], int32_t (&xsum)[Tile]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t rows[kGemvRowsPerGroup];
#pragma unroll
    for (int i = 0; i < kGemvRowsPerGroup; ++i) {
      rows[i] = Format == WeightFormat::kTernaryPacked ? ternary_slot_codes(chunk_word(w[0], j), i)
                                                       : chunk_word(w[i], j);
    }
#pragma unroll
    for (int t = 0; t < Tile; ++t) {
      const uint32_t xw = chunk_word(x[t], j);
      if (Format == WeightFormat::kTernaryPacked) xsum[t] = dot4(0x01010101u, xw, xsum[t]);
#pragma unroll
      for (int i = 0; i < kGemvRowsPerGroup; ++i) acc[i][t] = dot4(rows[i], xw, acc[i][t]);
    }
  }
}

//! The exact dot product of row i from a lane's (or the warp's summed) accumulators.
template <WeightFormat Format, int Tile>
BITNET_HD int32_t gemv_finish(const int32_t (&acc)[kGemvRowsPerGroup][Tile], const int32_t (&xsum)[Tile], int i,
                              int t) {
  return Format == WeightFormat::kTernaryPacked ? acc[i][t] - xsum[t] : acc[i][t];
}

#if defined(__CUDACC__)

template <WeightFormat Format, int Tile>
__global__ void __launch_bounds__(kGemvWarps* kWarpSize)
    linear_gemv_kernel(const Activations a, const LinearOperands op, const int64_t k_pad) {
  extern __shared__ __align__(16) unsigned char gemv_smem[];
  int8_t* codes = reinterpret_cast<int8_t*>(gemv_smem);
  float* scales = reinterpret_cast<float*>(gemv_smem + Tile * k_pad);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * Tile;
  const int tokens = static_cast<int>(a.m - m0 < Tile ? a.m - m0 : Tile);

  // 1. Prologue: this tile's token codes (and scales) into shared memory; unused rows are zeroed.
  for (int t = warp; t < Tile; t += kGemvWarps) {
    int8_t* dst = codes + t * k_pad;
    const int64_t row = m0 + t;
    if (t >= tokens) {
      for (int64_t i = lane; i < k_pad; i += kWarpSize) dst[i] = 0;
      if (lane == 0) scales[t] = 0.0f;
    } else if (a.x != nullptr) {
      const float scale = quantize_token_warp(a.x, a.x_kind, row * a.ldx, a.k, dst, k_pad, lane);
      if (lane == 0) scales[t] = scale;
    } else {
      const int8_t* src = a.codes + row * a.ldq;
      for (int64_t i = lane; i < k_pad; i += kWarpSize) dst[i] = i < a.k ? src[i] : int8_t(0);
      if (lane == 0) scales[t] = a.scales != nullptr ? a.scales[row] : 0.0f;
    }
  }
  __syncthreads();

  // 2. Stream the weight: one row group per warp step.
  const int64_t groups = gemv_groups(Format, op.n);
  const int64_t chunks = k_pad / kChunkBytes;
  const bool aligned = op.weight_aligned16 && a.k % kChunkBytes == 0;
  const uint8_t pad = Format == WeightFormat::kTernaryPacked ? kPackedZeroByte : uint8_t(0);
  const int64_t warps_in_grid = static_cast<int64_t>(gridDim.x) * kGemvWarps;
  // After the reduction, lane l < 4 * Tile owns output row l / Tile of token l % Tile (4 * Tile <= 32).
  static_assert(kGemvRowsPerGroup * Tile <= kWarpSize, "one reduced value per lane");
  const int my_row = lane / Tile;
  const int my_token = lane % Tile;

  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp; g < groups; g += warps_in_grid) {
    const uint8_t* rows[kGemvRowsPerGroup];
#pragma unroll
    for (int i = 0; i < kGemvRowsPerGroup; ++i) {
      // int8: rows past N (last group) read row N-1; their sums are computed but never stored.
      const int64_t r = Format == WeightFormat::kTernaryPacked
                            ? g
                            : (g * kGemvRowsPerGroup + i < op.n ? g * kGemvRowsPerGroup + i : op.n - 1);
      rows[i] = op.weight + r * a.k;
    }
    int32_t acc[kGemvRowsPerGroup][Tile] = {};
    int32_t xsum[Tile] = {};
    for (int64_t c = lane; c < chunks; c += kWarpSize) {
      uint4 w[kGemvRowsPerGroup];
#pragma unroll
      for (int i = 0; i < kGemvRowsPerGroup; ++i) {
        w[i] = (Format == WeightFormat::kTernaryPacked && i > 0)
                   ? make_uint4(0, 0, 0, 0)
                   : load_chunk16(rows[i], c * kChunkBytes, a.k, aligned, pad);
      }
      uint4 x[Tile];
#pragma unroll
      for (int t = 0; t < Tile; ++t) x[t] = *reinterpret_cast<const uint4*>(codes + t * k_pad + c * kChunkBytes);
      gemv_accumulate_chunk<Format, Tile>(w, x, acc, xsum);
    }

    // 3. Reduce over the warp; each lane keeps the value it owns and stores it.
    int32_t mine = 0;
#pragma unroll
    for (int i = 0; i < kGemvRowsPerGroup; ++i) {
#pragma unroll
      for (int t = 0; t < Tile; ++t) {
        const int32_t total = warp_sum(gemv_finish<Format, Tile>(acc, xsum, i, t));
        if (i == my_row && t == my_token) mine = total;
      }
    }
    if (lane < kGemvRowsPerGroup * Tile && my_token < tokens) {
      const int64_t n = gemv_output_row(Format, op.n, g, my_row);
      if (n < op.n) store_linear_output(op, m0 + my_token, n, mine, scales[my_token]);
    }
  }
}

#endif  // __CUDACC__

}  // namespace bitnet_cuda
