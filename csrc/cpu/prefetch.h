// bitnet CPU kernels: where a decode GEMV prefetches (torch-free).
//
// A decode GEMV streams each weight byte once, a group of rows at a time. While a thread reads one row group,
// it prefetches the next row group of its own range into L2, line by line at the offset it is reading now, so
// the prefetches stay exactly one group ahead whatever K is: a fixed byte distance is wrong for some K, and the
// L2 streamer alone keeps too few misses in flight for a GEMV (~60% of the memory bandwidth).
#pragma once

#include <cstdint>

namespace bitnet_cpu {

//! The rows [first, first + rows) of a row-major matrix (`stride` elements per row), when they end by `end`
//! (one past this thread's last row); null when they do not, so a thread never prefetches another's rows.
template <typename T>
inline const T* rows_ahead(const T* base, int64_t first, int64_t rows, int64_t end, int64_t stride) {
  return first + rows <= end ? base + first * stride : nullptr;
}

//! Number of rows of `stride` bytes that cover `bytes` (at least one): how many rows ahead of the one being read
//! a decode loop prefetches, so that about `bytes` are in flight whatever the row length.
inline int64_t prefetch_rows_ahead(int64_t stride, int64_t bytes) {
  return stride <= 0 || stride >= bytes ? 1 : (bytes + stride - 1) / stride;
}

//! First column (a multiple of 64, one cache line of int8 / packed bytes) of part `part` of `parts` equal shares
//! of a K-column row: the decode kernels let each group of tokens that re-reads a row prefetch one share of the
//! next row's lines, so that prefetches are issued all the time (part == parts gives the end, >= K).
inline int64_t prefetch_share_begin(int64_t K, int64_t part, int64_t parts) {
  return (K + 63) / 64 * part / parts * 64;
}

}  // namespace bitnet_cpu
