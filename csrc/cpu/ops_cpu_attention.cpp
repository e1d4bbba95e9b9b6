// ATen binding of bitnet::decode_attention on CPU: grouped-query attention of a few query tokens against a KV
// cache, for decoding.
//
// decode_attention(q, k, v, attn_mask, scale) is F.scaled_dot_product_attention(q, k, v, attn_mask, scale=scale,
// enable_gqa=True) computed by SDPA's own CPU kernel, with less work:
//   * The key positions after the last one any query may attend (the unused tail of a static KV cache, which
//     SDPA would otherwise score, mask and skip, step after step) are dropped before SDPA runs; when every
//     query sees every position that is left (one unpadded sequence), the mask is dropped too.
//   * With one query token and a mask shared by all heads, the query heads of a KV group become the rows of
//     one query block ([B, Hkv, G, D] instead of [B, Hq, 1, D]), so SDPA reads and converts each KV head once
//     instead of once per query head.
// Each output row is still one query's softmax-weighted sum over the same keys, but SDPA's kernel may block and
// order the float sums differently for the smaller problem, so results agree with the plain SDPA call within
// float rounding (tested against float64), not bit for bit.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <utility>
#include <optional>

namespace bitnet_cpu {
namespace {

constexpr const char* kOp = "bitnet::decode_attention";

void check_decode_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), kOp,
              ": q, k and v must be CPU tensors, got ", q.device(), ", ", k.device(), " and ", v.device());
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()), kOp, ": q must be floating-point, got dtype ",
                   q.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), kOp,
                   ": q, k and v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), " and ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, kOp,
                    ": q, k and v must be 4-D [batch, heads, length, head_dim], got shapes ", q.sizes(), ", ",
                    k.sizes(), " and ", v.sizes());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), kOp, ": k and v must have the same shape, got ", k.sizes(), " and ",
                    v.sizes());
  TORCH_CHECK_VALUE(q.size(0) == k.size(0) && q.size(3) == k.size(3), kOp,
                    ": q and k differ in batch or head_dim (q ", q.sizes(), ", k ", k.sizes(), ")");
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0, kOp,
                    ": the query heads must be a multiple of the key/value heads, got ", q.size(1), " and ",
                    k.size(1));
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device().is_cpu(), kOp, ": attn_mask must be a CPU tensor, got device ", m.device());
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || m.scalar_type() == q.scalar_type(), kOp,
                     ": attn_mask must be bool (True = attend) or additive in q's dtype ", q.scalar_type(),
                     ", got dtype ", m.scalar_type());
    const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2);
    TORCH_CHECK_VALUE(m.dim() == 4 && m.size(3) == k.size(2) && (m.size(0) == 1 || m.size(0) == B) &&
                          (m.size(1) == 1 || m.size(1) == Hq) && (m.size(2) == 1 || m.size(2) == L),
                      kOp, ": attn_mask must be 4-D [batch or 1, heads or 1, q_len or 1, kv_len] with batch = ", B,
                      ", heads = ", Hq, ", q_len = ", L, ", kv_len = ", k.size(2), ", got shape ", m.sizes());
  }
}

//! What a [B|1, H|1, L|1, S] mask lets queries see: one past the last key position any query may attend (0 when
//! none may), and whether every query sees every position before that one (then the mask adds nothing).
std::pair<int64_t, bool> attended_keys(const at::Tensor& mask) {
  const int64_t S = mask.size(3);
  at::Tensor rows = mask.reshape({-1, S});  // a [B, 1, 1, S] mask is small
  rows = rows.scalar_type() == at::kBool ? rows.contiguous() : rows.to(at::kFloat).contiguous();
  const int64_t R = rows.size(0);
  const bool* mb = rows.scalar_type() == at::kBool ? rows.data_ptr<bool>() : nullptr;
  const float* ma = mb == nullptr ? rows.data_ptr<float>() : nullptr;
  const float neg_inf = -std::numeric_limits<float>::infinity();  // additive masks hide a position with -inf
  auto hidden = [&](int64_t i) { return mb != nullptr ? !mb[i] : ma[i] == neg_inf; };
  int64_t count = 0;
  for (int64_t r = 0; r < R; ++r) {
    int64_t s = S - 1;
    while (s >= count && hidden(r * S + s)) --s;
    count = std::max(count, s + 1);
  }
  bool plain = true;  // every entry in [0, count) visible, with additive value 0
  for (int64_t r = 0; r < R && plain; ++r)
    for (int64_t s = 0; s < count && plain; ++s) plain = mb != nullptr ? mb[r * S + s] : ma[r * S + s] == 0.f;
  return {count, plain};
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& attn_mask, double scale) {
  check_decode_attention_args(q, k, v, attn_mask);
  at::Tensor keys = k, values = v;
  std::optional<at::Tensor> mask = attn_mask;
  if (mask.has_value()) {
    const auto [keep, plain] = attended_keys(*mask);
    // keep == 0: no query may attend anything; the call stays as it is, so SDPA's own rule decides the output.
    if (keep > 0 && keep < k.size(2)) {
      keys = k.narrow(2, 0, keep);
      values = v.narrow(2, 0, keep);
      mask = mask->narrow(3, 0, keep);
    }
    // What is left visible to every query (one unpadded sequence): no mask for SDPA to convert and apply.
    if (keep > 0 && plain) mask = std::nullopt;
  }
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1);
  const bool shared_mask = !mask.has_value() || (mask->size(1) == 1 && mask->size(2) == 1);
  if (q.size(2) == 1 && Hq > Hkv && shared_mask && B > 0) {
    const at::Tensor rows = q.reshape({B, Hkv, Hq / Hkv, D});
    return at::scaled_dot_product_attention(rows, keys, values, mask, 0.0, false, scale).reshape({B, Hq, 1, D});
  }
  return at::scaled_dot_product_attention(q, keys, values, mask, 0.0, false, scale, /*enable_gqa=*/Hq != Hkv);
}

}  // namespace
}  // namespace bitnet_cpu

TORCH_LIBRARY_IMPL(bitnet, CPU, m) { m.impl("decode_attention", &bitnet_cpu::decode_attention); }
