// bitnet CUDA kernels: the prefill (many tokens) linear on int8 tensor cores, torch-free.
//
// out[m, n] = epilogue(sum_k A[m, k] * W[n, k]) with A the int8 token codes [M, lda] (already quantized)
// and W ternary (packed, SPEC §3) or int8 rows. Instruction: mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32
// (sm_80+), exact int32 accumulation.
//
// Block tile 128 tokens x 128 outputs x 64 K-bytes, 256 threads = 8 warps as 2 (tokens) x 4 (outputs), each
// warp 64 x 32 = 4 x 4 mma tiles. Shared memory, double-buffered (2 x 20 KiB, static):
//   a[buf][row][k]: token codes, row-major, rows padded to 80 bytes (conflict-free 32-bit fragment loads);
//   b[buf][col][k]: the weight tile decoded ONCE to int8 {-1, 0, 1} (ternary) or copied (int8), K-contiguous
//                   per output column ("col" operand of mma), same padding. No float weight ever exists.
// Ternary output columns: the block owns packed rows p0 .. p0+31; decoded column c = slot * 32 + (p - p0)
// is output n = slot * P + p, so warp column group wn (= slot) writes 32 consecutive outputs.
// int8 output columns: the block owns rows n0 .. n0+127; column c is output n0 + c.
// Tails: tokens >= M, outputs >= N and columns >= K are padded in shared memory (zeros for A, so their
// products vanish; code 1 = value 0 for packed weights) and never stored.
// Pipeline: global loads of tile k+1 go to registers while tile k is multiplied from shared memory; one
// barrier per K tile.
// mma fragments (PTX ISA, m16n8k32 .s8; g = lane / 4, t = lane % 4):
//   A: a0 = A[g][4t..4t+3], a1 = A[g+8][4t..], a2 = A[g][16+4t..], a3 = A[g+8][16+4t..]
//   B: b0 = B[4t..4t+3][g], b1 = B[16+4t..][g]          (B stored K-contiguous per column n = g)
//   C: c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1]
#pragma once

#include "common.cuh"

namespace bitnet_cuda {

constexpr int kGemmThreads = 256;
constexpr int kTileM = 128;
constexpr int kTileN = 128;
constexpr int kTileK = 64;
//! Packed rows of one ternary output tile (4 outputs per packed row).
constexpr int kTilePackedRows = kTileN / kValuesPerByte;
//! Shared-memory row pitch: 80 bytes = 20 words, so the 8 rows g = 0..7 of a fragment load hit 8 distinct
//! groups of 4 banks.
constexpr int kSmemPitch = kTileK + 16;
constexpr int kWarpTileM = 64;
constexpr int kWarpTileN = 32;
constexpr int kMmaM = 16;
constexpr int kMmaN = 8;
constexpr int kMmaK = 32;
constexpr int kWarpMmasM = kWarpTileM / kMmaM;  // 4
constexpr int kWarpMmasN = kWarpTileN / kMmaN;  // 4
constexpr int kWarpsN = kTileN / kWarpTileN;    // 4

//! Output-column tiles of the grid (x dimension).
BITNET_HD int64_t gemm_column_tiles(WeightFormat format, int64_t n) {
  return format == WeightFormat::kTernaryPacked ? ceil_div(n / kValuesPerByte, kTilePackedRows)
                                                : ceil_div(n, kTileN);
}

//! Output feature of decoded tile column `col` (0..127) in column tile `tile`, or -1 past the end.
BITNET_HD int64_t gemm_output_column(WeightFormat format, int64_t n, int64_t tile, int col) {
  if (format == WeightFormat::kTernaryPacked) {
    const int64_t packed_rows = n / kValuesPerByte;
    const int64_t p = tile * kTilePackedRows + col % kTilePackedRows;
    return p < packed_rows ? (col / kTilePackedRows) * packed_rows + p : -1;
  }
  const int64_t out = tile * kTileN + col;
  return out < n ? out : -1;
}

#if defined(__CUDACC__)

struct GemmSmem {
  int8_t a[2][kTileM][kSmemPitch];
  int8_t b[2][kTileN][kSmemPitch];
};

//! Registers that carry one K tile from global to shared memory: 32 bytes of A per thread (row tid/2,
//! half tid%2) and 32 bytes of int8 B or 8 bytes of packed B (packed row tid/8, 8-byte segment tid%8).
struct GemmStage {
  uint4 a[2];
  uint4 b[2];
};

BITNET_HD void load_rows_32(const int8_t* base, int64_t ld, int64_t rows_left, int64_t k0, int64_t k,
                                bool aligned, int tid, uint4 (&out)[2]) {
  const int r = tid >> 1;
  const int64_t col = k0 + (tid & 1) * 32;
  const uint8_t* row = reinterpret_cast<const uint8_t*>(base) + r * ld;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    out[j] = r < rows_left ? load_chunk16(row, col + 16 * j, k, aligned, 0) : make_uint4(0, 0, 0, 0);
  }
}

BITNET_HD void store_rows_32(int8_t (*dst)[kSmemPitch], int tid, const uint4 (&v)[2]) {
  int8_t* p = &dst[tid >> 1][(tid & 1) * 32];
  reinterpret_cast<uint4*>(p)[0] = v[0];
  reinterpret_cast<uint4*>(p)[1] = v[1];
}

BITNET_HD uint2 load_packed_8(const uint8_t* packed, int64_t packed_rows, int64_t p0, int64_t k0, int64_t k,
                                  bool aligned8, int tid) {
  const int64_t p = p0 + (tid >> 3);
  const int64_t col = k0 + (tid & 7) * 8;
  constexpr uint32_t kZeroWord = 0x55555555u;
  if (p >= packed_rows) return make_uint2(kZeroWord, kZeroWord);
  const uint8_t* row = packed + p * k;
  if (aligned8 && col + 8 <= k) return *reinterpret_cast<const uint2*>(row + col);
  uint32_t words[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    uint32_t word = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int64_t c = col + 4 * j + b;
      word |= static_cast<uint32_t>(c < k ? row[c] : kPackedZeroByte) << (8 * b);
    }
    words[j] = word;
  }
  return make_uint2(words[0], words[1]);
}

//! Decode 8 packed bytes (8 columns of 4 output rows) into the 4 decoded tile columns slot*32 + prow.
BITNET_HD void store_packed_8(int8_t (*dst)[kSmemPitch], int tid, uint2 raw) {
  const int prow = tid >> 3;
  const int col = (tid & 7) * 8;
#pragma unroll
  for (int slot = 0; slot < kValuesPerByte; ++slot) {
    *reinterpret_cast<uint2*>(&dst[slot * kTilePackedRows + prow][col]) =
        make_uint2(ternary_slot_values(raw.x, slot), ternary_slot_values(raw.y, slot));
  }
}

//! Thread `tid`'s share of K tile [k0, k0 + 64) of block (m0, column_tile): global memory -> registers.
template <WeightFormat Format>
BITNET_HD void gemm_load_stage(const Activations& a, const LinearOperands& op, int64_t m0, int64_t column_tile,
                               int64_t k0, int tid, GemmStage& s) {
  const int64_t k = a.k;
  const bool a_aligned = a.codes_aligned16 && a.ldq % 16 == 0;
  load_rows_32(a.codes + m0 * a.ldq, a.ldq, a.m - m0, k0, k, a_aligned, tid, s.a);
  if (Format == WeightFormat::kTernaryPacked) {
    const bool aligned8 = op.weight_aligned16 && k % 8 == 0;
    const uint2 raw =
        load_packed_8(op.weight, op.n / kValuesPerByte, column_tile * kTilePackedRows, k0, k, aligned8, tid);
    s.b[0] = make_uint4(raw.x, raw.y, 0, 0);
  } else {
    const int64_t n0 = column_tile * kTileN;
    const bool aligned = op.weight_aligned16 && k % 16 == 0;
    load_rows_32(reinterpret_cast<const int8_t*>(op.weight) + n0 * k, k, op.n - n0, k0, k, aligned, tid, s.b);
  }
}

//! Registers -> shared memory; ternary weights are decoded to int8 {-1, 0, 1} here, once per tile.
template <WeightFormat Format>
BITNET_HD void gemm_store_stage(int8_t (*a_tile)[kSmemPitch], int8_t (*b_tile)[kSmemPitch], int tid,
                                const GemmStage& s) {
  store_rows_32(a_tile, tid, s.a);
  if (Format == WeightFormat::kTernaryPacked) {
    store_packed_8(b_tile, tid, make_uint2(s.b[0].x, s.b[0].y));
  } else {
    store_rows_32(b_tile, tid, s.b);
  }
}

BITNET_HD uint32_t lds32(const int8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

//! Lane `lane` of warp (wm, wn) loads its mma fragments for K step [kk, kk + 32) of the tile (layout: top).
BITNET_HD void gemm_load_fragments(const int8_t (*a_tile)[kSmemPitch], const int8_t (*b_tile)[kSmemPitch], int wm,
                                   int wn, int lane, int kk, uint32_t (&af)[kWarpMmasM][4],
                                   uint32_t (&bf)[kWarpMmasN][2]) {
  const int g = lane >> 2;
  const int t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < kWarpMmasM; ++mi) {
    const int8_t* p = &a_tile[wm * kWarpTileM + mi * kMmaM + g][kk + 4 * t];
    af[mi][0] = lds32(p);
    af[mi][1] = lds32(p + 8 * kSmemPitch);
    af[mi][2] = lds32(p + 16);
    af[mi][3] = lds32(p + 8 * kSmemPitch + 16);
  }
#pragma unroll
  for (int ni = 0; ni < kWarpMmasN; ++ni) {
    const int8_t* p = &b_tile[wn * kWarpTileN + ni * kMmaN + g][kk + 4 * t];
    bf[ni][0] = lds32(p);
    bf[ni][1] = lds32(p + 16);
  }
}

//! Tile row (token) of accumulator element e of mma tile mi held by `lane` of warp row wm.
BITNET_HD int gemm_acc_row(int wm, int lane, int mi, int e) {
  return wm * kWarpTileM + mi * kMmaM + (lane >> 2) + (e >= 2 ? 8 : 0);
}

//! Tile column (decoded weight column) of accumulator element e of mma tile ni held by `lane` of warp column wn.
BITNET_HD int gemm_acc_col(int wn, int lane, int ni, int e) {
  return wn * kWarpTileN + ni * kMmaN + 2 * (lane & 3) + (e & 1);
}

BITNET_DEVICE void mma_s8(int32_t (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // never launched: the host only selects this kernel on sm_80+ (gemm_supported)
#endif
}

template <WeightFormat Format>
__global__ void __launch_bounds__(kGemmThreads) linear_gemm_kernel(const Activations a, const LinearOperands op) {
  __shared__ __align__(16) GemmSmem smem;
  const int tid = threadIdx.x;
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int wm = warp / kWarpsN;
  const int wn = warp % kWarpsN;
  const int64_t column_tile = blockIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  int32_t acc[kWarpMmasM][kWarpMmasN][4] = {};
  const int64_t k_tiles = ceil_div(a.k, kTileK);
  GemmStage stage;
  if (k_tiles > 0) {
    gemm_load_stage<Format>(a, op, m0, column_tile, 0, tid, stage);
    gemm_store_stage<Format>(smem.a[0], smem.b[0], tid, stage);
  }
  __syncthreads();
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    const int buf = static_cast<int>(kt & 1);
    if (kt + 1 < k_tiles) gemm_load_stage<Format>(a, op, m0, column_tile, (kt + 1) * kTileK, tid, stage);  // in flight
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += kMmaK) {
      uint32_t af[kWarpMmasM][4];
      uint32_t bf[kWarpMmasN][2];
      gemm_load_fragments(smem.a[buf], smem.b[buf], wm, wn, lane, kk, af, bf);
#pragma unroll
      for (int mi = 0; mi < kWarpMmasM; ++mi) {
#pragma unroll
        for (int ni = 0; ni < kWarpMmasN; ++ni) mma_s8(acc[mi][ni], af[mi], bf[ni]);
      }
    }
    if (kt + 1 < k_tiles) gemm_store_stage<Format>(smem.a[buf ^ 1], smem.b[buf ^ 1], tid, stage);
    __syncthreads();
  }

  // Epilogue: accumulator element e of tile (mi, ni) is C[g + 8 (e >= 2)][2t + (e & 1)].
  const bool scaled = op.out_kind != ElemKind::kInt32;
#pragma unroll
  for (int mi = 0; mi < kWarpMmasM; ++mi) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t m = m0 + gemm_acc_row(wm, lane, mi, e);
      if (m >= a.m) continue;
      const float x_scale = scaled ? a.scales[m] : 0.0f;
#pragma unroll
      for (int ni = 0; ni < kWarpMmasN; ++ni) {
        const int64_t n = gemm_output_column(Format, op.n, column_tile, gemm_acc_col(wn, lane, ni, e));
        if (n >= 0) store_linear_output(op, m, n, acc[mi][ni][e], x_scale);
      }
    }
  }
}

#endif  // __CUDACC__

}  // namespace bitnet_cuda
