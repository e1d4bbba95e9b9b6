// The bitnet operator schemas: one TORCH_LIBRARY block, nothing else.
//
// The contract ops must match bitnet_torch/ops.py OP_SCHEMAS exactly (tests/test_ops_cpu.py checks it);
// their numbers are defined by bitnet_torch/_reference_ops.py. Backends register implementations with
// TORCH_LIBRARY_IMPL(bitnet, CPU / CUDA, m). The two underscore ops are utilities of the CPU backend:
// _cpu_isa(request) selects the instruction set ("" reports it, "auto" picks the fastest, else "scalar",
// "avx2", "avx512" or "amx") and returns the active one; _cpu_isa_available() lists what this CPU supports.
// float_linear (the float lm_head, csrc/cpu/ops_cpu_float.cpp) has its own path selector with the same
// conventions: _float_gemv_isa(request) ("scalar", "avx2", "avx512", "avx512_bf16") / _float_gemv_isa_available().
// decode_attention (csrc/cpu/ops_cpu_attention.cpp) is SDPA with grouped-query support for decoding from a KV cache;
// rms_norm (csrc/cpu/ops_cpu_norm.cpp) is BitNet's RMSNorm in one pass per row; rotary_embedding
// (csrc/cpu/ops_cpu_rotary.cpp) is Transformers' apply_rotary_pos_emb in one pass.
#include <torch/library.h>

TORCH_LIBRARY(bitnet, m) {
  m.def("quantize_activation(Tensor x) -> (Tensor, Tensor)");
  m.def("ternary_matmul(Tensor x_q, Tensor packed) -> Tensor");
  m.def("ternary_linear(Tensor x, Tensor packed, Tensor weight_scale, Tensor? bias) -> Tensor");
  m.def("ternary_linear_group(Tensor x, Tensor[] packed, Tensor[] weight_scale, Tensor?[] bias) -> Tensor[]");
  m.def("quantize_pack_weight(Tensor w) -> (Tensor, Tensor)");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias) -> Tensor");
  m.def("float_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rotary_embedding(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  // decode_step (csrc/cpu/decode_engine*.cpp): one whole forward step of a packed model for a batch of rows.
  m.def("decode_step(Tensor token_ids, Tensor positions, Tensor slots, Tensor logit_rows, Tensor embed, Tensor? embed_scale, Tensor norms, Tensor[] packed, Tensor weight_scales, Tensor rope_cos, Tensor rope_sin, Tensor head, Tensor? head_scale, Tensor(a!) k_cache, Tensor(b!) v_cache, int num_heads, int num_kv_heads, float eps, float attn_scale) -> Tensor");
  m.def("_cpu_isa(str request) -> str");
  m.def("_cpu_isa_available() -> str[]");
  m.def("_float_gemv_isa(str request) -> str");
  m.def("_float_gemv_isa_available() -> str[]");
}
