// bitnet CPU decode engine: one whole forward step of a packed BitNet b1.58 model (torch-free).
//
// Why this shape (issue 12): the ternary kernels already stream weights at 60-91% of the read bandwidth; what a
// decode step loses is everything between them -- 7 projection calls per layer (each a fork/join of the thread
// pool that lets the memory stream ramp down and up again), Python, Dynamo guards and the framework ops for
// norms, rotary, cache writes and attention. run_decode_step does the whole step for R rows (tokens) inside ONE
// OpenMP parallel region: the threads stay alive for the whole step and meet at barriers between phases
//   rows:  [embed] input norm + quantize          gemv: q/k/v (one pass over the three weights)
//   pairs: rotary + KV-cache write                pairs: attention per (row, KV head)
//   rows:  attn_sub_norm + quantize               gemv: o_proj
//   rows:  residual, post-attention norm, quantize   gemv: gate/up
//   rows:  relu^2 * up, ffn_sub_norm, quantize    gemv: down
//   rows:  residual (and the next layer's input norm)   ... final norm, quantize; gemv: the head
// and a thread that finishes its share of a projection prefetches the first rows of its share of the next one
// while it waits at the barrier. The inner loops are the ISA-dispatched kernels of kernel_api.h (and the float
// GEMV of float_gemv.h for a float head), so every projection gives the numbers of bitnet::ternary_linear.
//
// Rows are independent: a row is one token of one sequence ("slot") at one position; it attends to positions
// [0, position] of its slot's cache, whose entries at earlier positions were written by earlier steps or by an
// earlier row of this step (every row's K/V are written before any row attends). So one call serves a decode
// step of B sequences (one row each) and a prefill chunk of one sequence (consecutive positions), and a row's
// numbers never depend on the other rows: per-row norms and quantization, exact int32 accumulation, attention
// computed by one thread in a fixed order. That is the batch invariance the server relies on.
//
// Numerics: activations are held in fp32 buffers but rounded to the model dtype (fp32 / bf16 / fp16) after
// every operation where the eager PyTorch model rounds (each op's output), so the engine follows the eager
// model's arithmetic step for step: RMSNorm as bitnet::rms_norm (same code), projections as
// bitnet::ternary_linear, rotary as bitnet::rotary_embedding (bit for bit), the residual adds, relu^2 and the
// product with up as the ATen element-wise ops, the head as bitnet::int8_linear / bitnet::float_linear. Only
// attention differs in the order of its fp32 sums (and in exp) from SDPA's kernel: float rounding.
#pragma once

#include <cstdint>

#include "kernel_api.h"

namespace bitnet_cpu {

//! Largest vocabulary the engine takes (its head is shared among the threads in blocks of 64 rows, whose count
//! must fit work_sharing.h's 24-bit ranges).
constexpr int64_t kMaxEngineVocab = int64_t(1) << 29;

//! The architecture of the model the engine runs.
struct EngineDims {
  int64_t layers = 0;        //!< L
  int64_t hidden = 0;        //!< H (= heads * head_dim)
  int64_t intermediate = 0;  //!< I
  int64_t heads = 0;         //!< Hq
  int64_t kv_heads = 0;      //!< Hkv (Hq a multiple of it)
  int64_t head_dim = 0;      //!< D (even)
  int64_t vocab = 0;         //!< V
  int64_t slots = 0;         //!< S: sequences the KV cache holds
  int64_t max_positions = 0; //!< T: positions per sequence in the KV cache (and rows of the rotary table)
  float eps = 1e-6f;         //!< RMSNorm epsilon
  float attn_scale = 1.f;    //!< softmax scale (head_dim ** -0.5)
};

//! Head weight formats.
enum class HeadKind : int { Int8 = 0, BF16 = 1, F32 = 2 };

//! Pointers to the model's weights and the KV cache (nothing is copied).
struct EngineWeights {
  FloatKind act = FloatKind::F32;     //!< the model dtype: activations and the KV cache
  const void* embed = nullptr;        //!< [V, H] rows: int8 codes (embed_scale set) or floats of embed_kind
  FloatKind embed_kind = FloatKind::F32;
  const float* embed_scale = nullptr; //!< [V] per-row scales of an int8 embedding, else null
  //! fp32 norm gains: per layer input (H), attn_sub (H), post_attention (H), ffn_sub (I); then the final norm (H).
  const float* norms = nullptr;
  const uint8_t* const* packed = nullptr;  //!< 7 per layer: q, k, v, o, gate, up, down ([N/4, K] contiguous)
  const float* weight_scales = nullptr;    //!< [7 L] multiply-convention scales (mean |W|)
  const float* rope_cos = nullptr;    //!< [T, D] (values of the model dtype)
  const float* rope_sin = nullptr;    //!< [T, D]
  const void* head = nullptr;         //!< [V, H]
  HeadKind head_kind = HeadKind::F32;
  const float* head_scale = nullptr;  //!< [V] for an int8 head
  void* k_cache = nullptr;            //!< [L, S, Hkv, T, D] in the model dtype
  void* v_cache = nullptr;
};

//! What one step computes.
struct EngineBatch {
  int64_t rows = 0;                   //!< R
  const int64_t* tokens = nullptr;    //!< [R] token ids
  const int64_t* positions = nullptr; //!< [R] position of each row in its slot
  const int64_t* slots = nullptr;     //!< [R] the slot of each row
  int64_t logit_rows = 0;             //!< NL
  const int64_t* logit_index = nullptr;  //!< [NL] rows whose logits are wanted
  float* logits = nullptr;            //!< [NL, V] out: the model-dtype logits as fp32
};

//! Offset of a layer's norm gains in EngineWeights::norms (which: 0 input, 1 attn_sub, 2 post, 3 ffn_sub).
int64_t engine_norm_offset(const EngineDims& d, int64_t layer, int which);
//! Number of fp32 values in EngineWeights::norms.
int64_t engine_norm_count(const EngineDims& d);

//! Run one step on `threads` threads (one parallel region). Inputs are assumed validated by the caller.
void run_decode_step(const KernelTable& kt, const EngineDims& dims, const EngineWeights& weights,
                     const EngineBatch& batch, int threads);

}  // namespace bitnet_cpu
