"""Turn a pretrained Transformers Llama-family model into a trainable BitNet model (start of the λ warm-up).

:func:`convert_llama_to_bitnet` keeps every weight (shared, not copied: embeddings, norms, the seven
projections, ``lm_head``), replaces the projections by :class:`~bitnet_torch.nn.BitLinear`, and inserts the
SubLN norms of the BitNet architecture (``attn_sub_norm`` before ``o_proj``, ``ffn_sub_norm`` before
``down_proj``) as RMSNorms with weight 1.

An RMSNorm with weight 1 is **not** the identity: it rescales each token's attention output / MLP hidden
state to unit RMS. The converted model therefore differs from the original even at λ = 0; the warm-up
(``bitnet_torch.set_lambda`` from 0 to 1 while training) is what adapts the weights to it. By default the MLP
keeps the source activation (``silu`` for Llama) rather than BitNet b1.58's ``relu2``, so that nothing else
changes: the result is a 1bitLLM-style SiLU BitNet, which GGUF exports as arch ``bitnet`` (upstream llama.cpp
and bitnet.cpp both compute it). ``hidden_act="relu2"`` switches to BitNet b1.58's squared ReLU instead
(bitnet.cpp's ``bitnet-b1.58``; the model then departs further from the source and training must adapt it).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.bitnet import modeling_bitnet as hf_bitnet

from .configuration import MASTER_QUANTIZATION_CONFIG, BitNetConfig
from .modeling import BitNetForCausalLM

__all__ = ["convert_llama_to_bitnet", "bitnet_config_from_llama"]


def bitnet_config_from_llama(llama_config, hidden_act: str | None = None) -> BitNetConfig:
    """The :class:`BitNetConfig` with a Llama config's shape (master form). Refuses what BitNet cannot express.

    ``hidden_act``: ``None`` keeps the source's activation (``silu`` for a Llama); ``"relu2"`` (or another
    Transformers activation name) replaces it.
    """
    head_dim = getattr(llama_config, "head_dim", None) or llama_config.hidden_size // llama_config.num_attention_heads
    if head_dim * llama_config.num_attention_heads != llama_config.hidden_size:
        raise ValueError(
            f"num_attention_heads * head_dim = {head_dim * llama_config.num_attention_heads} differs from hidden_size "
            f"{llama_config.hidden_size}; the BitNet attention sub-norm needs them equal"
        )
    if getattr(llama_config, "mlp_bias", False):
        raise ValueError("the BitNet MLP has no biases; this model has mlp_bias=True")
    return BitNetConfig(
        vocab_size=llama_config.vocab_size,
        hidden_size=llama_config.hidden_size,
        intermediate_size=llama_config.intermediate_size,
        num_hidden_layers=llama_config.num_hidden_layers,
        num_attention_heads=llama_config.num_attention_heads,
        num_key_value_heads=llama_config.num_key_value_heads,
        hidden_act=llama_config.hidden_act if hidden_act is None else hidden_act,
        max_position_embeddings=llama_config.max_position_embeddings,
        initializer_range=llama_config.initializer_range,
        rms_norm_eps=llama_config.rms_norm_eps,
        rope_parameters=dict(llama_config.rope_parameters),
        tie_word_embeddings=llama_config.tie_word_embeddings,
        attention_bias=llama_config.attention_bias,
        bos_token_id=llama_config.bos_token_id,
        eos_token_id=llama_config.eos_token_id,
        pad_token_id=llama_config.pad_token_id,
        quantization_config=dict(MASTER_QUANTIZATION_CONFIG),
    )


def convert_llama_to_bitnet(llama_model: nn.Module, hidden_act: str | None = None) -> BitNetForCausalLM:
    """Return a trainable :class:`BitNetForCausalLM` sharing ``llama_model``'s weights, SubLN norms added.

    ``llama_model`` is a Transformers ``LlamaForCausalLM`` (or a model with the same module names and config
    fields, e.g. Mistral/Qwen2 without biases). Its parameters are moved into the new model (the two share
    storage: do not keep training the original). The SubLN norms start at weight 1 (see the module
    docstring: that is not the identity). Set λ with ``bitnet_torch.set_lambda(model, λ)`` for the warm-up.
    ``hidden_act``: ``None`` (default) keeps the source's FFN activation (a Llama's ``silu``); ``"relu2"``
    switches to BitNet b1.58's squared ReLU.
    """
    config = bitnet_config_from_llama(llama_model.config, hidden_act=hidden_act)
    config._attn_implementation = llama_model.config._attn_implementation
    source = llama_model.state_dict(keep_vars=True)
    with torch.device("meta"):
        model = BitNetForCausalLM(config)
    expected = set(model.state_dict().keys())
    sub_norms = {k for k in expected if ".attn_sub_norm." in k or ".ffn_sub_norm." in k}
    wanted = expected - sub_norms
    if config.tie_word_embeddings:
        wanted.discard("lm_head.weight")
    missing = sorted(k for k in wanted if k not in source)
    if missing:
        raise ValueError(f"{type(llama_model).__name__} lacks the Llama tensors {missing[:5]} (of {len(missing)})")
    model.load_state_dict({k: source[k] for k in wanted}, strict=False, assign=True)
    device = model.model.embed_tokens.weight.device
    dtype = model.model.embed_tokens.weight.dtype
    for name in sub_norms:
        module = model.get_submodule(name.rpartition(".")[0])
        module.weight = nn.Parameter(torch.ones(module.weight.shape, device=device, dtype=dtype))
    model.model.rotary_emb = hf_bitnet.BitNetRotaryEmbedding(config=config).to(device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if leftover:
        raise RuntimeError(f"conversion left tensors uninitialised: {leftover[:5]}")
    model.train(llama_model.training)
    return model
