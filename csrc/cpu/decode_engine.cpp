// bitnet CPU decode engine: the whole-step implementation (torch-free). See decode_engine.h for the design.
#include "decode_engine.h"

#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "float_gemv.h"
#include "fp32_loops.h"
#include "scalar_common.h"
#include "work_sharing.h"

namespace bitnet_cpu {
namespace {

// The engine's fp32 loops carry the multi-versioning of fp32_loops.h; the norms use its sum_squares, the
// code bitnet::rms_norm runs, so that the engine's norms equal the op's bit for bit.
BITNET_ISA_CLONES float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

//! y += a * x
BITNET_ISA_CLONES void axpy(float* y, float a, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = y[i] + a * x[i];
}

BITNET_ISA_CLONES void widen_bf16(const uint16_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = uint32_t(src[i]) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    dst[i] = f;
  }
}

// Attention's two hot loops over a KV head's cache rows (fp32 or bf16), one call per (row, KV head): the
// scores of its G query heads against every key, then the probability-weighted sum of the values. Whole loops
// in one multi-versioned function (a call per dot product cost more than the arithmetic: measured, pp128).
BITNET_ISA_CLONES void attention_scores(const float* q, int64_t G, const void* keys, bool bf16, int64_t len,
                                        int64_t D, float scale, float* scores) {
  for (int64_t j = 0; j < len; ++j) {
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * D;
      float s = 0.f;
      if (bf16) {
        const uint16_t* k = static_cast<const uint16_t*>(keys) + j * D;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < D; ++i) s += qg[i] * std::bit_cast<float>(uint32_t(k[i]) << 16);
      } else {
        const float* k = static_cast<const float*>(keys) + j * D;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < D; ++i) s += qg[i] * k[i];
      }
      scores[g * len + j] = s * scale;
    }
  }
}

BITNET_ISA_CLONES void attention_values(const float* p, int64_t G, const void* values, bool bf16, int64_t len,
                                        int64_t D, float* acc) {
  for (int64_t j = 0; j < len; ++j) {
    for (int64_t g = 0; g < G; ++g) {
      const float a = p[g * len + j];
      float* out = acc + g * D;
      if (bf16) {
        const uint16_t* v = static_cast<const uint16_t*>(values) + j * D;
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) out[i] = out[i] + a * std::bit_cast<float>(uint32_t(v[i]) << 16);
      } else {
        const float* v = static_cast<const float*>(values) + j * D;
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) out[i] = out[i] + a * v[i];
      }
    }
  }
}

//! v rounded to the model dtype (and back to fp32): what storing it in a tensor of that dtype does.
inline float round_to(FloatKind kind, float v) {
  switch (kind) {
    case FloatKind::BF16: return bf16_to_float(float_to_bf16(v));
    case FloatKind::F16: return f16_to_float(float_to_f16(v));
    default: return v;
  }
}

// The element-wise steps of a layer, over whole rows. Each is the eager op's arithmetic with its rounding to
// the model dtype after every op; bf16 rounding (scalar_common.h float_to_bf16, branch-free) vectorises, so the
// bf16 and fp32 loops get SIMD clones for AVX-512 / AVX2; fp16 keeps the scalar conversion. Measured at B = 8 on
// the 2B-4T shape (1 thread, AVX-512): the scalar loops were 24% of a decode step (16 ms of 67).
inline float bf16_round(float f) { return bf16_to_float(float_to_bf16(f)); }

//! v[i] = r(v[i])
BITNET_ISA_CLONES void round_row(FloatKind kind, float* v, int64_t n) {
  if (kind == FloatKind::BF16) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) v[i] = bf16_round(v[i]);
  } else if (kind == FloatKind::F16) {
    for (int64_t i = 0; i < n; ++i) v[i] = round_to(kind, v[i]);
  }
}

//! out[i] = r(w[i] * r(x[i] * inv)): the tail of bitnet::rms_norm (out may be x).
BITNET_ISA_CLONES void norm_scale_row(FloatKind kind, const float* x, const float* w, float inv, int64_t n,
                                      float* out) {
  if (kind == FloatKind::BF16) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = bf16_round(w[i] * bf16_round(x[i] * inv));
  } else if (kind == FloatKind::F32) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = round_to(kind, w[i] * round_to(kind, x[i] * inv));
  }
}

//! h[i] = r(h[i] + r(o[i])): the residual add of a projection's output.
BITNET_ISA_CLONES void residual_row(FloatKind kind, float* h, const float* o, int64_t n) {
  if (kind == FloatKind::BF16) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) h[i] = bf16_round(h[i] + bf16_round(o[i]));
  } else if (kind == FloatKind::F32) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) h[i] = h[i] + o[i];
  } else {
    for (int64_t i = 0; i < n; ++i) h[i] = round_to(kind, h[i] + round_to(kind, o[i]));
  }
}

//! relu(x) that keeps NaN (torch.relu).
inline float relu_keep_nan(float x) { return x > 0.f ? x : (x == x ? 0.f : x); }

//! a[i] = r(r(relu(r(g[i]))^2) * r(u[i])): the FFN's relu^2(gate) * up.
BITNET_ISA_CLONES void relu2_mul_row(FloatKind kind, const float* g, const float* u, int64_t n, float* a) {
  if (kind == FloatKind::BF16) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float relu = relu_keep_nan(bf16_round(g[i]));
      a[i] = bf16_round(bf16_round(relu * relu) * bf16_round(u[i]));
    }
  } else if (kind == FloatKind::F32) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float relu = relu_keep_nan(g[i]);
      a[i] = (relu * relu) * u[i];
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float relu = relu_keep_nan(round_to(kind, g[i]));
      a[i] = round_to(kind, round_to(kind, relu * relu) * round_to(kind, u[i]));
    }
  }
}

//! Rotary embedding of one head x [D] (values of the model dtype) with the position's cos / sin, in place,
//! with bitnet::rotary_embedding's roundings: out_i = r(r(x_i cos_i) + r(-x_{i+D/2} sin_i)) and
//! out_{i+D/2} = r(r(x_{i+D/2} cos_{i+D/2}) + r(x_i sin_{i+D/2})). tmp: D floats of scratch.
BITNET_ISA_CLONES void rotary_row(FloatKind kind, float* x, const float* cs, const float* sn, int64_t D, float* tmp) {
  const int64_t half = D / 2;
  if (kind == FloatKind::BF16) {
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = x[i], x2 = x[i + half];
      tmp[i] = bf16_round(bf16_round(x1 * cs[i]) + bf16_round(-x2 * sn[i]));
      tmp[i + half] = bf16_round(bf16_round(x2 * cs[i + half]) + bf16_round(x1 * sn[i + half]));
    }
  } else if (kind == FloatKind::F32) {
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = x[i], x2 = x[i + half];
      tmp[i] = x1 * cs[i] + -x2 * sn[i];
      tmp[i + half] = x2 * cs[i + half] + x1 * sn[i + half];
    }
  } else {
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = x[i], x2 = x[i + half];
      tmp[i] = round_to(kind, round_to(kind, x1 * cs[i]) + round_to(kind, -x2 * sn[i]));
      tmp[i + half] = round_to(kind, round_to(kind, x2 * cs[i + half]) + round_to(kind, x1 * sn[i + half]));
    }
  }
  std::memcpy(x, tmp, size_t(D) * 4);
}

//! n values of a float tensor of `kind` at `src` (element offset `at`) into fp32.
inline void load_row(const void* src, FloatKind kind, int64_t at, float* dst, int64_t n) {
  switch (kind) {
    case FloatKind::BF16: widen_bf16(static_cast<const uint16_t*>(src) + at, dst, n); break;
    case FloatKind::F16:
      for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_float(static_cast<const uint16_t*>(src)[at + i]);
      break;
    default: std::memcpy(dst, static_cast<const float*>(src) + at, size_t(n) * 4);
  }
}

//! n fp32 values (already exact in `kind`) stored into a tensor of `kind` at element offset `at`.
inline void store_row(void* dst, FloatKind kind, int64_t at, const float* src, int64_t n) {
  switch (kind) {
    case FloatKind::BF16:
      for (int64_t i = 0; i < n; ++i) static_cast<uint16_t*>(dst)[at + i] = float_to_bf16(src[i]);
      break;
    case FloatKind::F16:
      for (int64_t i = 0; i < n; ++i) static_cast<uint16_t*>(dst)[at + i] = float_to_f16(src[i]);
      break;
    default: std::memcpy(static_cast<float*>(dst) + at, src, size_t(n) * 4);
  }
}

int64_t round_up4(int64_t v) { return (v + 3) / 4 * 4; }

//! bitnet::rms_norm of one row x (values of the model dtype) with gains w: out = r(w * r(x * inv)).
void rms_norm_row(FloatKind kind, const float* x, const float* w, int64_t n, float eps, float* out) {
  const float variance = sum_squares(x, n) / static_cast<float>(n);
  const float inv = 1.f / std::sqrt(variance + eps);
  norm_scale_row(kind, x, w, inv, n, out);
}

//! One packed projection of a GEMV phase.
struct Member {
  const uint8_t* packed = nullptr;
  int64_t P = 0;  //!< packed rows (N / 4)
  int64_t K = 0;
  OutputSpec spec;
};

int64_t chunks_of(const Member& m) { return (m.P + kTernaryTileP - 1) / kTernaryTileP; }

int64_t total_chunks(const Member* members, int G) {
  int64_t total = 0;
  for (int g = 0; g < G; ++g) total += chunks_of(members[g]);
  return total;
}

//! This thread's static share [c0, c1) of the chunks (kTernaryTileP packed rows) of all members, concatenated.
void thread_chunks(const Member* members, int G, int tid, int nth, int64_t* c0, int64_t* c1) {
  const int64_t total = total_chunks(members, G);
  *c0 = total * tid / nth;
  *c1 = total * (tid + 1) / nth;
}

//! The chunks [c0, c1) of a GEMV phase's members, concatenated, computed for the R rows of x_q.
void gemv_chunks(const KernelTable& kt, const Member* members, int G, const int8_t* x_q, int64_t lda,
                 const int32_t* x_sum, int64_t R, int64_t c0, int64_t c1) {
  int64_t first = 0;
  for (int g = 0; g < G && c0 < c1; ++g) {
    const Member& m = members[g];
    const int64_t n = chunks_of(m);
    const int64_t lo = std::max(c0, first), hi = std::min(c1, first + n);
    if (lo < hi)
      kt.ternary_gemm(x_q, lda, x_sum, m.K, 0, R, m.packed, m.P, (lo - first) * kTernaryTileP,
                      std::min(m.P, (hi - first) * kTernaryTileP), m.spec);
    first += n;
  }
}

//! Prefetch into L2 the first `bytes` of chunk c of a GEMV phase, not past chunk c_end nor the end of c's member.
void prefetch_chunks(const Member* members, int G, int64_t c, int64_t c_end, int64_t bytes) {
  int64_t first = 0;
  for (int g = 0; g < G; ++g) {
    const Member& m = members[g];
    const int64_t n = chunks_of(m);
    if (c < first + n) {
      const int64_t p0 = (c - first) * kTernaryTileP;
      const int64_t p1 = std::min(m.P, (std::min(c_end, first + n) - first) * kTernaryTileP);
      const char* base = reinterpret_cast<const char*>(m.packed + p0 * m.K);
      const int64_t len = std::min(bytes, (p1 - p0) * m.K);
      for (int64_t off = 0; off < len; off += 64) __builtin_prefetch(base + off, 0, 2);
      return;
    }
    first += n;
  }
}

// A phase's chunks fit PhaseQueues' 24-bit ranges: q/k/v (3 x hidden / 64 at most) and gate/up below
// kMaxTernaryK (checked by the op), the head's blocks of 64 rows below kMaxEngineVocab (checked likewise).
static_assert(3 * kMaxTernaryK / (4 * kTernaryTileP) <= PhaseQueues::kMaxChunks, "projection chunks overflow");
static_assert(kMaxEngineVocab / 64 <= PhaseQueues::kMaxChunks, "head blocks overflow");

//! Chunks a thread takes from its own share at a time: one kernel call, whose rows prefetch each other.
constexpr int64_t kOwnChunksPerTake = 4;
//! Bytes of its next take a thread prefetches before it computes the current one (the kernels prefetch a few
//! rows ahead, but not past the end of their call).
constexpr int64_t kNextTakePrefetchBytes = 8 * 1024;

//! The projections of one input (GEMV phase number `phase` of the step), inside the caller's parallel region:
//! this thread's share, then whatever is left of the others' (work_sharing.h). Like
//! bitnet::ternary_linear_group's decode pass.
void gemv_phase(const KernelTable& kt, const Member* members, int G, const int8_t* x_q, int64_t lda,
                const int32_t* x_sum, int64_t R, int tid, PhaseQueues& queues, uint32_t phase) {
  queues.run_phase(
      tid, phase, total_chunks(members, G), kOwnChunksPerTake,
      [&](int64_t c0, int64_t c1) { gemv_chunks(kt, members, G, x_q, lda, x_sum, R, c0, c1); },
      [&](int64_t c, int64_t end) { prefetch_chunks(members, G, c, end, kNextTakePrefetchBytes); });
}

//! Prefetch into L2 the first `bytes` of this thread's share of a GEMV phase (the next one, while this thread
//! waits for the others at the barrier): the next projection's stream starts without the ramp-up.
void prefetch_phase(const Member* members, int G, int tid, int nth, int64_t bytes) {
  int64_t c0, c1;
  thread_chunks(members, G, tid, nth, &c0, &c1);
  if (c0 < c1) prefetch_chunks(members, G, c0, c1, bytes);
}

//! Quantize row r of `x` (n values, fp32 holding model-dtype values) into x_q (zero padded to a multiple of 4).
void quantize_row(const KernelTable& kt, const float* x, int64_t n, int8_t* x_q, int64_t lda, float* scale,
                  int32_t* sum, int64_t r) {
  kt.quantize_rows(x, FloatKind::F32, n, 0, 1, x_q + r * lda, lda, scale + r, sum + r);
  for (int64_t k = n; k < round_up4(n); ++k) x_q[r * lda + k] = 0;
}

}  // namespace

int64_t engine_norm_offset(const EngineDims& d, int64_t layer, int which) {
  const int64_t per_layer = 3 * d.hidden + d.intermediate;
  return layer * per_layer + std::min(which, 3) * d.hidden;
}

int64_t engine_norm_count(const EngineDims& d) { return d.layers * (3 * d.hidden + d.intermediate) + d.hidden; }

void run_decode_step(const KernelTable& kt, const EngineDims& d, const EngineWeights& w, const EngineBatch& b,
                     int threads) {
  const int64_t R = b.rows, H = d.hidden, I = d.intermediate, D = d.head_dim;
  const int64_t Hq = d.heads, Hkv = d.kv_heads, G = Hq / Hkv, T = d.max_positions, S = d.slots;
  const int64_t QKV = (Hq + 2 * Hkv) * D;
  const FloatKind act = w.act;
  const int64_t lda = round_up4(std::max(H, I));
  // Step buffers (fp32 values rounded to the model dtype): residual stream, normed input, q/k/v, attention
  // output, projection output, gate|up; int8 codes with scales and row sums.
  std::unique_ptr<float[]> h(new float[R * H]), xn(new float[R * std::max(H, I)]), qkv(new float[R * QKV]),
      attn(new float[R * Hq * D]), proj(new float[R * H]), gu(new float[R * 2 * I]);
  std::unique_ptr<int8_t[]> x_q(new int8_t[R * lda]);
  std::unique_ptr<float[]> x_scale(new float[R]);
  std::unique_ptr<int32_t[]> x_sum(new int32_t[R]);
  const int64_t NL = b.logit_rows;
  std::unique_ptr<uint16_t[]> head_bf16(w.head_kind == HeadKind::BF16 && act == FloatKind::BF16
                                            ? new uint16_t[std::max<int64_t>(NL, 1) * H]
                                            : nullptr);

  auto spec_f32 = [&](float* out, int64_t ldo, const float* ws) {
    OutputSpec s;
    s.out = out;
    s.ldo = ldo;
    s.out_kind = FloatKind::F32;
    s.x_scale = x_scale.get();
    s.w_scale = ws;
    return s;
  };
  auto member = [&](int64_t layer, int which, int64_t K, float* out, int64_t ldo) {
    Member m;
    m.packed = w.packed[layer * 7 + which];
    m.K = K;
    m.spec = spec_f32(out, ldo, w.weight_scales + layer * 7 + which);
    return m;
  };
  // The GEMV phases of every layer, built once (pointers only).
  std::vector<Member> members(size_t(d.layers) * 7);
  for (int64_t l = 0; l < d.layers; ++l) {
    Member* m = &members[size_t(l) * 7];
    m[0] = member(l, 0, H, qkv.get(), QKV);
    m[0].P = Hq * D / 4;
    m[1] = member(l, 1, H, qkv.get() + Hq * D, QKV);
    m[1].P = Hkv * D / 4;
    m[2] = member(l, 2, H, qkv.get() + (Hq + Hkv) * D, QKV);
    m[2].P = Hkv * D / 4;
    m[3] = member(l, 3, Hq * D, proj.get(), H);
    m[3].P = H / 4;
    m[4] = member(l, 4, H, gu.get(), 2 * I);
    m[4].P = I / 4;
    m[5] = member(l, 5, H, gu.get() + I, 2 * I);
    m[5].P = I / 4;
    m[6] = member(l, 6, I, proj.get(), H);
    m[6].P = H / 4;
  }
  // The ISA's attention loops when it has them (and head_dim suits them), else the portable ones below.
  const bool simd_attention = kt.attention_scores != nullptr && kt.attention_values != nullptr && D % 16 == 0;
  // Bytes each thread prefetches of its next projection while waiting (a few row groups of the kernels).
  constexpr int64_t kPrefetchBytes = 32 * 1024;
  // The GEMV phases' chunks, shared among the threads (work_sharing.h); phases numbered from 1 in every thread.
  PhaseQueues queues(threads);

#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    if (tid == 0) queues.set_threads(nth);  // before the first barrier; OpenMP may give fewer than asked
    uint32_t phase = 0;
    std::vector<float> tmp(size_t(std::max<int64_t>(D, 1)) * 2);
    std::vector<float> scores;
    std::vector<float> acc(static_cast<size_t>(G * D)), total(static_cast<size_t>(G));
    auto rows_of = [&](auto&& fn) {  // per-row work: row r on thread r % nth
      for (int64_t r = tid; r < R; r += nth) fn(r);
    };
    auto pairs_of = [&](auto&& fn) {  // per (row, KV head) work, contiguous blocks
      const int64_t n = R * Hkv, p0 = n * tid / nth, p1 = n * (tid + 1) / nth;
      for (int64_t p = p0; p < p1; ++p) fn(p / Hkv, p % Hkv);
    };

    // Embedding rows, then layer 0's input norm.
    rows_of([&](int64_t r) {
      float* hr = h.get() + r * H;
      const int64_t tok = b.tokens[r];
      if (w.embed_scale != nullptr) {
        const int8_t* e = static_cast<const int8_t*>(w.embed) + tok * H;
        const float s = w.embed_scale[tok];
        for (int64_t k = 0; k < H; ++k) hr[k] = round_to(act, float(e[k]) * s);
      } else {
        load_row(w.embed, w.embed_kind, tok * H, hr, H);
        round_row(act, hr, H);  // an fp32 table in a bf16 model: the lookup's .to(dtype)
      }
      if (d.layers > 0) {
        rms_norm_row(act, hr, w.norms + engine_norm_offset(d, 0, 0), H, d.eps, xn.get() + r * H);
        quantize_row(kt, xn.get() + r * H, H, x_q.get(), lda, x_scale.get(), x_sum.get(), r);
      }
    });
#pragma omp barrier

    for (int64_t l = 0; l < d.layers; ++l) {
      const Member* m = &members[size_t(l) * 7];
      // q / k / v
      gemv_phase(kt, m, 3, x_q.get(), lda, x_sum.get(), R, tid, queues, ++phase);
      prefetch_phase(m + 3, 1, tid, nth, kPrefetchBytes);
#pragma omp barrier
      // rotary, then K / V into the cache
      pairs_of([&](int64_t r, int64_t kvh) {
        const int64_t pos = b.positions[r], slot = b.slots[r];
        const float* cs = w.rope_cos + pos * D;
        const float* sn = w.rope_sin + pos * D;
        float* row = qkv.get() + r * QKV;
        auto rotate = [&](float* x) {
          round_row(act, x, D);
          rotary_row(act, x, cs, sn, D, tmp.data());
        };
        for (int64_t g = 0; g < G; ++g) rotate(row + (kvh * G + g) * D);
        float* k = row + (Hq + kvh) * D;
        float* v = row + (Hq + Hkv + kvh) * D;
        rotate(k);
        round_row(act, v, D);
        const int64_t at = (((l * S + slot) * Hkv + kvh) * T + pos) * D;
        store_row(w.k_cache, act, at, k, D);
        store_row(w.v_cache, act, at, v, D);
      });
#pragma omp barrier
      // attention of the G query heads of each (row, KV head) against positions [0, pos] of the row's slot
      pairs_of([&](int64_t r, int64_t kvh) {
        const int64_t len = b.positions[r] + 1, slot = b.slots[r];
        const int64_t base = (((l * S + slot) * Hkv + kvh) * T) * D;
        const float* q = qkv.get() + r * QKV + kvh * G * D;
        scores.resize(size_t(G * len));
        float* kv = tmp.data();
        const bool direct = act != FloatKind::F16;  // fp32 / bf16 caches are read in place
        const size_t elem = act == FloatKind::F32 ? 4 : 2;
        const char* kbase = static_cast<const char*>(w.k_cache) + size_t(base) * elem;
        const char* vbase = static_cast<const char*>(w.v_cache) + size_t(base) * elem;
        if (direct) {
          (simd_attention ? kt.attention_scores : attention_scores)(q, G, kbase, act == FloatKind::BF16, len, D,
                                                                   d.attn_scale, scores.data());
        } else {
          for (int64_t j = 0; j < len; ++j) {
            load_row(w.k_cache, act, base + j * D, kv, D);
            for (int64_t g = 0; g < G; ++g) scores[size_t(g * len + j)] = dot(q + g * D, kv, D) * d.attn_scale;
          }
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t g = 0; g < G; ++g) {
          float* s = scores.data() + g * len;
          float mx = -INFINITY;
          for (int64_t j = 0; j < len; ++j) mx = std::max(mx, s[j]);
          float sum = 0.f;
          for (int64_t j = 0; j < len; ++j) {
            s[j] = std::exp(s[j] - mx);
            sum += s[j];
          }
          // SDPA's CPU kernel (flash attention) multiplies V by the probabilities rounded to the input dtype
          // (the fp32 sum is of the unrounded ones): doing the same halves the distance to it in bf16.
          round_row(act, s, len);
          total[size_t(g)] = sum;
        }
        if (direct) {
          (simd_attention ? kt.attention_values : attention_values)(scores.data(), G, vbase, act == FloatKind::BF16,
                                                                   len, D, acc.data());
        } else {
          for (int64_t j = 0; j < len; ++j) {
            load_row(w.v_cache, act, base + j * D, kv, D);
            for (int64_t g = 0; g < G; ++g) axpy(acc.data() + g * D, scores[size_t(g * len + j)], kv, D);
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          float* out = attn.get() + r * Hq * D + (kvh * G + g) * D;
          const float inv = 1.f / total[size_t(g)];
          for (int64_t i = 0; i < D; ++i) out[i] = round_to(act, acc[size_t(g * D + i)] * inv);
        }
      });
#pragma omp barrier
      rows_of([&](int64_t r) {
        rms_norm_row(act, attn.get() + r * Hq * D, w.norms + engine_norm_offset(d, l, 1), Hq * D, d.eps,
                     xn.get() + r * H);
        quantize_row(kt, xn.get() + r * H, Hq * D, x_q.get(), lda, x_scale.get(), x_sum.get(), r);
      });
#pragma omp barrier
      gemv_phase(kt, m + 3, 1, x_q.get(), lda, x_sum.get(), R, tid, queues, ++phase);
      prefetch_phase(m + 4, 2, tid, nth, kPrefetchBytes);
#pragma omp barrier
      rows_of([&](int64_t r) {
        float* hr = h.get() + r * H;
        const float* o = proj.get() + r * H;
        residual_row(act, hr, o, H);
        rms_norm_row(act, hr, w.norms + engine_norm_offset(d, l, 2), H, d.eps, xn.get() + r * H);
        quantize_row(kt, xn.get() + r * H, H, x_q.get(), lda, x_scale.get(), x_sum.get(), r);
      });
#pragma omp barrier
      gemv_phase(kt, m + 4, 2, x_q.get(), lda, x_sum.get(), R, tid, queues, ++phase);
      prefetch_phase(m + 6, 1, tid, nth, kPrefetchBytes);
#pragma omp barrier
      rows_of([&](int64_t r) {
        float* g = gu.get() + r * 2 * I;
        const float* u = g + I;
        float* a = xn.get() + r * std::max(H, I);
        relu2_mul_row(act, g, u, I, a);
        // in place: rms_norm_row reads a[k] before writing out[k]; the sum of squares is taken first
        rms_norm_row(act, a, w.norms + engine_norm_offset(d, l, 3), I, d.eps, a);
        quantize_row(kt, a, I, x_q.get(), lda, x_scale.get(), x_sum.get(), r);
      });
#pragma omp barrier
      gemv_phase(kt, m + 6, 1, x_q.get(), lda, x_sum.get(), R, tid, queues, ++phase);
      if (l + 1 < d.layers) prefetch_phase(m + 7, 3, tid, nth, kPrefetchBytes);
#pragma omp barrier
      rows_of([&](int64_t r) {
        float* hr = h.get() + r * H;
        const float* o = proj.get() + r * H;
        residual_row(act, hr, o, H);
        if (l + 1 < d.layers) {
          rms_norm_row(act, hr, w.norms + engine_norm_offset(d, l + 1, 0), H, d.eps, xn.get() + r * H);
          quantize_row(kt, xn.get() + r * H, H, x_q.get(), lda, x_scale.get(), x_sum.get(), r);
        }
      });
#pragma omp barrier
    }

    // Final norm of the rows whose logits are wanted (row i of the head's input is logit_index[i]).
    for (int64_t i = tid; i < NL; i += nth) {
      const int64_t r = b.logit_index[i];
      float* out = xn.get() + i * H;
      rms_norm_row(act, h.get() + r * H, w.norms + engine_norm_offset(d, d.layers, 0), H, d.eps, out);
      if (w.head_kind == HeadKind::Int8) quantize_row(kt, out, H, x_q.get(), lda, x_scale.get(), x_sum.get(), i);
      if (head_bf16) for (int64_t k = 0; k < H; ++k) head_bf16[size_t(i * H + k)] = float_to_bf16(out[k]);
    }
#pragma omp barrier
    if (NL > 0) {
      // The head's rows in blocks of 64, shared like the projections' chunks.
      const int64_t V = d.vocab, blocks = (V + 63) / 64;
      const size_t head_row_bytes = size_t(H) * (w.head_kind == HeadKind::Int8 ? 1 : w.head_kind == HeadKind::BF16 ? 2 : 4);
      auto head_blocks = [&](int64_t c0, int64_t c1) {
        const int64_t n0 = std::min(V, c0 * 64), n1 = std::min(V, c1 * 64);
        if (w.head_kind == HeadKind::Int8) {
          OutputSpec s = spec_f32(b.logits, V, w.head_scale);
          s.w_scale_per_col = true;
          kt.int8_gemm(x_q.get(), lda, H, 0, NL, static_cast<const int8_t*>(w.head), n0, n1, s);
        } else {
          FloatGemvArgs a;
          a.x_f32 = xn.get();
          a.x_bf16 = head_bf16.get();
          a.M = NL;
          a.K = H;
          a.w = w.head;
          a.w_bf16 = w.head_kind == HeadKind::BF16;
          a.out = b.logits;
          a.ldo = V;
          float_gemv_rows(a, n0, n1);
        }
        for (int64_t i = 0; i < NL; ++i) round_row(act, b.logits + i * V + n0, n1 - n0);
      };
      queues.run_phase(tid, ++phase, blocks, kOwnChunksPerTake, head_blocks, [&](int64_t c, int64_t) {
        const char* next = static_cast<const char*>(w.head) + size_t(c) * 64 * head_row_bytes;
        const size_t len = std::min<size_t>(kNextTakePrefetchBytes, size_t(std::min(V, c * 64 + 64) - c * 64) * head_row_bytes);
        for (size_t off = 0; off < len; off += 64) __builtin_prefetch(next + off, 0, 2);
      });
    }
  }
}

}  // namespace bitnet_cpu
