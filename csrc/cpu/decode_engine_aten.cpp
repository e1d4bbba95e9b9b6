// ATen binding of bitnet::decode_step on CPU: argument checks, then one call of the torch-free engine
// (decode_engine.h) on torch.get_num_threads() threads, with the kernel table of the active instruction set
// (the one bitnet::_cpu_isa reports, so BITNET_TORCH_CPU_ISA and set_cpu_isa apply to the engine too).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "decode_engine.h"
#include "isa.h"

namespace bitnet_cpu {
namespace {

constexpr const char* kOp = "bitnet::decode_step";

const KernelTable& engine_kernels() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bitnet::_cpu_isa", "")
                             .typed<std::string(c10::string_view)>();
  Isa isa;
  const std::string name = op.call("");
  TORCH_CHECK(parse_isa(name, &isa), kOp, ": unknown active instruction set ", name);
  return kernels_for(isa);
}

FloatKind kind_of(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return FloatKind::BF16;
    case at::kHalf: return FloatKind::F16;
    default: return FloatKind::F32;
  }
}

bool is_model_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, std::vector<int64_t> shape) {
  TORCH_CHECK(t.device().is_cpu(), kOp, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, kOp, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(shape), kOp, ": ", name, " must have shape ", at::IntArrayRef(shape),
                    ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), kOp, ": ", name, " must be contiguous");
}

//! Every value of an int64 vector in [0, bound).
void check_range(const at::Tensor& t, const char* name, int64_t bound, const char* what) {
  const int64_t* v = t.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i)
    TORCH_CHECK_VALUE(v[i] >= 0 && v[i] < bound, kOp, ": ", name, "[", i, "] = ", v[i], " is out of range (", what,
                      " ", bound, ")");
}

at::Tensor decode_step(const at::Tensor& token_ids, const at::Tensor& positions, const at::Tensor& slots,
                       const at::Tensor& logit_rows, const at::Tensor& embed, const c10::optional<at::Tensor>& embed_scale,
                       const at::Tensor& norms, at::TensorList packed, const at::Tensor& weight_scales,
                       const at::Tensor& rope_cos, const at::Tensor& rope_sin, const at::Tensor& head,
                       const c10::optional<at::Tensor>& head_scale, at::Tensor& k_cache, at::Tensor& v_cache,
                       int64_t num_heads, int64_t num_kv_heads, double eps, double attn_scale) {
  // Shapes of the model.
  TORCH_CHECK_VALUE(k_cache.dim() == 5, kOp, ": k_cache must be 5-D [layers, slots, kv_heads, positions, head_dim], got ",
                    k_cache.sizes());
  TORCH_CHECK_TYPE(is_model_float(k_cache.scalar_type()), kOp,
                   ": k_cache must be float32, bfloat16 or float16 (the model dtype), got ", k_cache.scalar_type());
  EngineDims d;
  d.layers = k_cache.size(0);
  d.slots = k_cache.size(1);
  d.kv_heads = k_cache.size(2);
  d.max_positions = k_cache.size(3);
  d.head_dim = k_cache.size(4);
  d.heads = num_heads;
  d.eps = static_cast<float>(eps);
  d.attn_scale = static_cast<float>(attn_scale);
  TORCH_CHECK_VALUE(num_kv_heads == d.kv_heads && num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0,
                    kOp, ": num_heads (", num_heads, ") must be a positive multiple of num_kv_heads (", num_kv_heads,
                    ") and num_kv_heads must match k_cache (", d.kv_heads, ")");
  TORCH_CHECK_VALUE(d.head_dim % 2 == 0 && d.head_dim > 0, kOp, ": head_dim must be even, got ", d.head_dim);
  TORCH_CHECK_VALUE(embed.dim() == 2, kOp, ": embed must be 2-D [vocab, hidden], got ", embed.sizes());
  d.vocab = embed.size(0);
  d.hidden = embed.size(1);
  TORCH_CHECK_VALUE(d.hidden == num_heads * d.head_dim, kOp, ": hidden (", d.hidden, ") must equal num_heads * head_dim (",
                    num_heads * d.head_dim, ")");
  TORCH_CHECK_VALUE(int64_t(packed.size()) == 7 * d.layers, kOp, ": packed must hold 7 weights per layer (",
                    7 * d.layers, "), got ", packed.size());
  TORCH_CHECK_VALUE(d.layers == 0 || packed[4].dim() == 2, kOp, ": packed[4] (gate_proj) must be 2-D");
  d.intermediate = d.layers > 0 ? packed[4].size(0) * 4 : 4;
  const int64_t H = d.hidden, I = d.intermediate, D = d.head_dim, V = d.vocab, T = d.max_positions;
  TORCH_CHECK_VALUE(H % 4 == 0, kOp, ": hidden must be a multiple of 4, got ", H);
  TORCH_CHECK_VALUE(H < kMaxTernaryK && I < kMaxTernaryK, kOp, ": hidden / intermediate too large");
  TORCH_CHECK_VALUE(V <= kMaxEngineVocab, kOp, ": vocab (", V, ") is above the engine's ", kMaxEngineVocab);
  const at::ScalarType act = k_cache.scalar_type();
  check_tensor(v_cache, "v_cache", act, k_cache.sizes().vec());
  TORCH_CHECK_VALUE(k_cache.is_contiguous(), kOp, ": k_cache must be contiguous");
  // Weights.
  const std::vector<std::pair<int64_t, int64_t>> shapes = {
      {num_heads * D / 4, H}, {num_kv_heads * D / 4, H}, {num_kv_heads * D / 4, H}, {H / 4, num_heads * D},
      {I / 4, H},             {I / 4, H},                {H / 4, I}};
  std::vector<const uint8_t*> packed_ptrs(packed.size());
  for (size_t i = 0; i < packed.size(); ++i) {
    const std::string name = "packed[" + std::to_string(i) + "]";
    const auto& s = shapes[i % 7];
    check_tensor(packed[i], name.c_str(), at::kByte, {s.first, s.second});
    packed_ptrs[i] = packed[i].const_data_ptr<uint8_t>();
  }
  check_tensor(weight_scales, "weight_scales", at::kFloat, {7 * d.layers});
  check_tensor(norms, "norms", at::kFloat, {engine_norm_count(d)});
  check_tensor(rope_cos, "rope_cos", at::kFloat, {T, D});
  check_tensor(rope_sin, "rope_sin", at::kFloat, {T, D});
  EngineWeights w;
  w.act = kind_of(act);
  if (embed_scale.has_value()) {
    check_tensor(embed, "embed", at::kChar, {V, H});
    check_tensor(*embed_scale, "embed_scale", at::kFloat, {V});
    w.embed_scale = embed_scale->const_data_ptr<float>();
  } else {
    TORCH_CHECK_TYPE(is_model_float(embed.scalar_type()), kOp,
                     ": embed must be float32, bfloat16 or float16 (or int8 with embed_scale), got ", embed.scalar_type());
    check_tensor(embed, "embed", embed.scalar_type(), {V, H});
    w.embed_kind = kind_of(embed.scalar_type());
  }
  w.embed = embed.const_data_ptr();
  if (head_scale.has_value()) {
    check_tensor(head, "head", at::kChar, {V, H});
    check_tensor(*head_scale, "head_scale", at::kFloat, {V});
    w.head_kind = HeadKind::Int8;
    w.head_scale = head_scale->const_data_ptr<float>();
  } else {
    TORCH_CHECK_TYPE(head.scalar_type() == at::kBFloat16 || head.scalar_type() == at::kFloat, kOp,
                     ": head must be bfloat16 or float32 (or int8 with head_scale), got ", head.scalar_type());
    check_tensor(head, "head", head.scalar_type(), {V, H});
    w.head_kind = head.scalar_type() == at::kBFloat16 ? HeadKind::BF16 : HeadKind::F32;
  }
  w.head = head.const_data_ptr();
  w.norms = norms.const_data_ptr<float>();
  w.packed = packed_ptrs.data();
  w.weight_scales = weight_scales.const_data_ptr<float>();
  w.rope_cos = rope_cos.const_data_ptr<float>();
  w.rope_sin = rope_sin.const_data_ptr<float>();
  w.k_cache = k_cache.data_ptr();
  w.v_cache = v_cache.data_ptr();
  // The step.
  TORCH_CHECK_VALUE(token_ids.dim() == 1 && token_ids.size(0) >= 1, kOp,
                    ": token_ids must be 1-D with at least one token, got shape ", token_ids.sizes());
  const int64_t R = token_ids.size(0);
  check_tensor(token_ids, "token_ids", at::kLong, {R});
  check_tensor(positions, "positions", at::kLong, {R});
  check_tensor(slots, "slots", at::kLong, {R});
  TORCH_CHECK_VALUE(logit_rows.dim() == 1, kOp, ": logit_rows must be 1-D, got shape ", logit_rows.sizes());
  check_tensor(logit_rows, "logit_rows", at::kLong, {logit_rows.size(0)});
  check_range(token_ids, "token_ids", V, "vocabulary size");
  check_range(positions, "positions", T, "cache positions");
  check_range(slots, "slots", d.slots, "cache slots");
  check_range(logit_rows, "logit_rows", R, "rows");
  {  // one row per (slot, position): two rows writing the same cache entry would race
    const int64_t* p = positions.const_data_ptr<int64_t>();
    const int64_t* s = slots.const_data_ptr<int64_t>();
    std::vector<std::pair<int64_t, int64_t>> keys(static_cast<size_t>(R));
    for (int64_t i = 0; i < R; ++i) keys[size_t(i)] = {s[i], p[i]};
    std::sort(keys.begin(), keys.end());
    TORCH_CHECK_VALUE(std::adjacent_find(keys.begin(), keys.end()) == keys.end(), kOp,
                      ": two rows write the same (slot, position) of the cache");
  }
  at::Tensor logits = at::empty({logit_rows.size(0), V}, token_ids.options().dtype(at::kFloat));
  EngineBatch b;
  b.rows = R;
  b.tokens = token_ids.const_data_ptr<int64_t>();
  b.positions = positions.const_data_ptr<int64_t>();
  b.slots = slots.const_data_ptr<int64_t>();
  b.logit_rows = logit_rows.size(0);
  b.logit_index = logit_rows.const_data_ptr<int64_t>();
  b.logits = logits.data_ptr<float>();
  run_decode_step(engine_kernels(), d, w, b, at::get_num_threads());
  return logits;
}

}  // namespace
}  // namespace bitnet_cpu

TORCH_LIBRARY_IMPL(bitnet, CPU, m) { m.impl("decode_step", &bitnet_cpu::decode_step); }
