// Host-side harness of the CUDA kernels' logic (no GPU needed): built by tests/test_cuda_compile.py with nvcc
// into a small shared library and driven from Python (ctypes) against the pure-PyTorch reference.
//
// It runs, on the CPU, the very __host__ __device__ functions the kernels are made of: the quantizer and
// packer arithmetic, the decode kernel's chunk loads, 2-bit decoding, dp4a accumulation, Σx correction and
// output mapping (lane by lane, then summed like the warp reduction), and the tensor-core kernel's tile
// loaders (with the ternary decode into shared memory), fragment loads and accumulator -> output mapping.
// The one thing it cannot run is the mma instruction itself: `emulate_mma` below implements the PTX ISA
// definition of mma.m16n8k32 .s8 (fragment layout as documented for that shape) so that the kernel's
// fragment indexing is checked against the specification, not against itself.
// Not part of the extension (csrc/cuda/tests/ is outside the build's source glob).
#include <cstring>
#include <vector>

#include "../gemm.cuh"
#include "../gemv.cuh"

using namespace bitnet_cuda;

namespace {

//! PTX ISA mma.m16n8k32.row.col .s8: D = A (16x32) * B (32x8) + C, with, for lane l (g = l / 4, t = l % 4):
//! A regs 0..3 hold A[g][4t..], A[g+8][4t..], A[g][16+4t..], A[g+8][16+4t..] (byte j = column offset j);
//! B regs 0..1 hold B[4t..4t+3][g], B[16+4t..][g]; C/D regs 0..3 hold C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1].
void emulate_mma(const uint32_t (&a)[32][4], const uint32_t (&b)[32][2], int32_t (&c)[32][4]) {
  int8_t A[16][32];
  int8_t B[32][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int j = 0; j < 4; ++j) {
      A[g][4 * t + j] = static_cast<int8_t>(a[l][0] >> (8 * j));
      A[g + 8][4 * t + j] = static_cast<int8_t>(a[l][1] >> (8 * j));
      A[g][16 + 4 * t + j] = static_cast<int8_t>(a[l][2] >> (8 * j));
      A[g + 8][16 + 4 * t + j] = static_cast<int8_t>(a[l][3] >> (8 * j));
      B[4 * t + j][g] = static_cast<int8_t>(b[l][0] >> (8 * j));
      B[16 + 4 * t + j][g] = static_cast<int8_t>(b[l][1] >> (8 * j));
    }
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const int rows[4] = {g, g, g + 8, g + 8};
    const int cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int e = 0; e < 4; ++e) {
      int32_t sum = 0;
      for (int k = 0; k < 32; ++k) sum += int32_t(A[rows[e]][k]) * int32_t(B[k][cols[e]]);
      c[l][e] += sum;
    }
  }
}

template <WeightFormat Format, int Tile>
void gemv_host(const int8_t* codes, int64_t m, int64_t ldq, int64_t k, const uint8_t* weight, int64_t n,
               bool aligned, int32_t* out) {
  const int64_t k_pad = gemv_padded_k(k);
  const int64_t chunks = k_pad / kChunkBytes;
  const uint8_t pad = Format == WeightFormat::kTernaryPacked ? kPackedZeroByte : uint8_t(0);
  std::vector<int8_t> tile_codes(static_cast<size_t>(Tile * k_pad));
  for (int64_t m0 = 0; m0 < m; m0 += Tile) {
    const int tokens = static_cast<int>(m - m0 < Tile ? m - m0 : Tile);
    // Prologue of the int8-codes path: rows padded with zeros to k_pad, unused rows zero.
    std::fill(tile_codes.begin(), tile_codes.end(), int8_t(0));
    for (int t = 0; t < tokens; ++t) std::memcpy(&tile_codes[t * k_pad], codes + (m0 + t) * ldq, k);
    for (int64_t g = 0; g < gemv_groups(Format, n); ++g) {
      const uint8_t* rows[kGemvRowsPerGroup];
      for (int i = 0; i < kGemvRowsPerGroup; ++i) {
        const int64_t r = Format == WeightFormat::kTernaryPacked
                              ? g
                              : (g * kGemvRowsPerGroup + i < n ? g * kGemvRowsPerGroup + i : n - 1);
        rows[i] = weight + r * k;
      }
      int32_t total[kGemvRowsPerGroup][Tile] = {};
      for (int lane = 0; lane < kWarpSize; ++lane) {
        int32_t acc[kGemvRowsPerGroup][Tile] = {};
        int32_t xsum[Tile] = {};
        for (int64_t c = lane; c < chunks; c += kWarpSize) {
          uint4 w[kGemvRowsPerGroup];
          for (int i = 0; i < kGemvRowsPerGroup; ++i) {
            w[i] = (Format == WeightFormat::kTernaryPacked && i > 0)
                       ? make_uint4(0, 0, 0, 0)
                       : load_chunk16(rows[i], c * kChunkBytes, k, aligned, pad);
          }
          uint4 x[Tile];
          for (int t = 0; t < Tile; ++t) std::memcpy(&x[t], &tile_codes[t * k_pad + c * kChunkBytes], 16);
          gemv_accumulate_chunk<Format, Tile>(w, x, acc, xsum);
        }
        for (int i = 0; i < kGemvRowsPerGroup; ++i)
          for (int t = 0; t < Tile; ++t) total[i][t] += gemv_finish<Format, Tile>(acc, xsum, i, t);
      }
      for (int i = 0; i < kGemvRowsPerGroup; ++i) {
        const int64_t row = gemv_output_row(Format, n, g, i);
        for (int t = 0; t < tokens; ++t)
          if (row < n) out[(m0 + t) * n + row] = total[i][t];
      }
    }
  }
}

template <WeightFormat Format>
void gemm_host(const int8_t* codes, int64_t m, int64_t ldq, bool codes_aligned, int64_t k, const uint8_t* weight,
               int64_t n, bool weight_aligned, int32_t* out) {
  Activations a;
  a.codes = codes;
  a.ldq = ldq;
  a.codes_aligned16 = codes_aligned;
  a.m = m;
  a.k = k;
  LinearOperands op;
  op.weight = weight;
  op.format = Format;
  op.weight_aligned16 = weight_aligned;
  op.n = n;
  alignas(16) static GemmSmem smem;  // one buffer is enough on the host: the phases run one after the other
  for (int64_t m0 = 0; m0 < m; m0 += kTileM) {
    for (int64_t tile = 0; tile < gemm_column_tiles(Format, n); ++tile) {
      int32_t acc[kGemmThreads / kWarpSize][kWarpSize][kWarpMmasM][kWarpMmasN][4] = {};
      for (int64_t k0 = 0; k0 < k; k0 += kTileK) {
        for (int tid = 0; tid < kGemmThreads; ++tid) {
          GemmStage stage;
          gemm_load_stage<Format>(a, op, m0, tile, k0, tid, stage);
          gemm_store_stage<Format>(smem.a[0], smem.b[0], tid, stage);
        }
        for (int warp = 0; warp < kGemmThreads / kWarpSize; ++warp) {
          const int wm = warp / kWarpsN, wn = warp % kWarpsN;
          for (int kk = 0; kk < kTileK; kk += kMmaK) {
            uint32_t af[kWarpSize][kWarpMmasM][4];
            uint32_t bf[kWarpSize][kWarpMmasN][2];
            for (int lane = 0; lane < kWarpSize; ++lane)
              gemm_load_fragments(smem.a[0], smem.b[0], wm, wn, lane, kk, af[lane], bf[lane]);
            for (int mi = 0; mi < kWarpMmasM; ++mi) {
              for (int ni = 0; ni < kWarpMmasN; ++ni) {
                uint32_t fa[32][4];
                uint32_t fb[32][2];
                int32_t fc[32][4];
                for (int lane = 0; lane < kWarpSize; ++lane) {
                  std::memcpy(fa[lane], af[lane][mi], sizeof fa[lane]);
                  std::memcpy(fb[lane], bf[lane][ni], sizeof fb[lane]);
                  std::memcpy(fc[lane], acc[warp][lane][mi][ni], sizeof fc[lane]);
                }
                emulate_mma(fa, fb, fc);
                for (int lane = 0; lane < kWarpSize; ++lane)
                  std::memcpy(acc[warp][lane][mi][ni], fc[lane], sizeof fc[lane]);
              }
            }
          }
        }
      }
      for (int warp = 0; warp < kGemmThreads / kWarpSize; ++warp) {
        const int wm = warp / kWarpsN, wn = warp % kWarpsN;
        for (int lane = 0; lane < kWarpSize; ++lane)
          for (int mi = 0; mi < kWarpMmasM; ++mi)
            for (int e = 0; e < 4; ++e) {
              const int64_t row = m0 + gemm_acc_row(wm, lane, mi, e);
              if (row >= m) continue;
              for (int ni = 0; ni < kWarpMmasN; ++ni) {
                const int64_t col = gemm_output_column(Format, n, tile, gemm_acc_col(wn, lane, ni, e));
                if (col >= 0) out[row * n + col] = acc[warp][lane][mi][ni][e];
              }
            }
      }
    }
  }
}

}  // namespace

extern "C" {

//! Per-token quantization of fp32 x [m, k] with the kernels' arithmetic.
void bitnet_host_quantize_rows(const float* x, int64_t m, int64_t k, int8_t* codes, float* scales) {
  for (int64_t r = 0; r < m; ++r) {
    float absmax = 0.0f;
    for (int64_t i = 0; i < k; ++i) absmax = nan_max(absmax, std::fabs(x[r * k + i]));
    const float clamped = clamp_absmax(absmax);
    const float inv = activation_inverse_scale(clamped);
    for (int64_t i = 0; i < k; ++i) codes[r * k + i] = quantize_activation_value(x[r * k + i], inv);
    scales[r] = activation_scale(clamped);
  }
}

//! Ternarize and pack fp32 w [n, k] with the scalar `scale`, as quantize_pack_weight_kernel does.
void bitnet_host_pack(const float* w, int64_t n, int64_t k, float scale, uint8_t* packed) {
  const int64_t rows = n / kValuesPerByte;
  for (int64_t p = 0; p < rows; ++p)
    for (int64_t c = 0; c < k; ++c) {
      uint32_t byte = 0;
      for (int slot = 0; slot < kValuesPerByte; ++slot) byte |= ternary_code(w[(slot * rows + p) * k + c], scale) << (2 * slot);
      packed[p * k + c] = static_cast<uint8_t>(byte);
    }
}

//! The linear epilogue of one output.
float bitnet_host_epilogue(int32_t acc, float x_scale, float w_scale, int has_bias, float bias) {
  return epilogue_value(acc, x_scale, w_scale, has_bias != 0, bias);
}

//! plan_gemv: returns ok and writes tile, token_tiles, smem_bytes.
int bitnet_host_plan_gemv(int64_t m, int64_t k, int64_t max_smem, int64_t* plan_out) {
  const GemvPlan plan = plan_gemv(m, k, max_smem);
  plan_out[0] = plan.tile;
  plan_out[1] = plan.token_tiles;
  plan_out[2] = plan.smem_bytes;
  return plan.ok ? 1 : 0;
}

//! Decode-kernel emulation on int8 codes [m, ldq]; format 0 ternary packed [n/4, k], 1 int8 rows [n, k].
//! `tile` is the token tile (1, 2, 4, 8); out is int32 [m, n].
int bitnet_host_gemv(int format, int tile, const int8_t* codes, int64_t m, int64_t ldq, int64_t k,
                     const uint8_t* weight, int64_t n, int aligned, int32_t* out) {
  const bool al = aligned != 0;
#define BITNET_GEMV_CASE(T)                                                                       \
  case T:                                                                                        \
    if (format == 0) gemv_host<WeightFormat::kTernaryPacked, T>(codes, m, ldq, k, weight, n, al, out); \
    else gemv_host<WeightFormat::kInt8Rows, T>(codes, m, ldq, k, weight, n, al, out);                 \
    return 1;
  switch (tile) {
    BITNET_GEMV_CASE(1)
    BITNET_GEMV_CASE(2)
    BITNET_GEMV_CASE(4)
    BITNET_GEMV_CASE(8)
    default: return 0;
  }
#undef BITNET_GEMV_CASE
}

//! Tensor-core-kernel emulation on int8 codes [m, ldq]; out is int32 [m, n].
void bitnet_host_gemm(int format, const int8_t* codes, int64_t m, int64_t ldq, int codes_aligned, int64_t k,
                      const uint8_t* weight, int64_t n, int weight_aligned, int32_t* out) {
  if (format == 0) {
    gemm_host<WeightFormat::kTernaryPacked>(codes, m, ldq, codes_aligned != 0, k, weight, n, weight_aligned != 0, out);
  } else {
    gemm_host<WeightFormat::kInt8Rows>(codes, m, ldq, codes_aligned != 0, k, weight, n, weight_aligned != 0, out);
  }
}

}  // extern "C"
