"""Tiny local BitNet checkpoints (float master or packed) with a byte-level BPE tokenizer, for GGUF/CLI tests.

Nothing comes from the hub: the tokenizer is trained here on a few sentences, the model is a random
Transformers ``BitNetForCausalLM``. Imported by test_gguf.py and test_cli.py (this file holds no tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import BitNetConfig, BitNetForCausalLM, PreTrainedTokenizerFast

from bitnet_torch import pack_ternary, quantize_weight

CORPUS = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "And God said, Let there be light: and there was light.",
    "User: What is your favourite food? Assistant: As an AI, I don't have personal preferences.",
] * 4
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "<|eot_id|>{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def save_tiny_tokenizer(model_dir: Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 pre-tokenizer) on CORPUS and save it with a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token="<|end_of_text|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(model_dir)
    return fast


def make_tiny_checkpoint(
    model_dir: Path,
    form: str = "float",
    hidden_size: int = 256,
    intermediate_size: int = 512,
    num_layers: int = 2,
    extra_vocab_rows: int = 8,
    tie_word_embeddings: bool = True,
    hidden_act: str = "relu2",
    embedding_std: float | None = None,
    head_std: float | None = None,
) -> Path:
    """Write a tiny BitNet checkpoint to ``model_dir`` and return it.

    ``form``: ``"float"`` (master weights, as plain Transformers saves them), ``"packed"`` (uint8 + weight_scale,
    ``autobitlinear`` multiply convention) or ``"packed_divide"`` (``linear_class="bitlinear"``: the scale is 1/mean|W|).
    ``hidden_act``: the FFN activation (``relu2`` BitNet b1.58, ``silu`` 1bitLLM style). ``embedding_std``: draw the
    (tied) embedding with this std instead of the initializer's 0.02; ``head_std`` likewise an untied ``lm_head``: a
    random model whose logits are spread enough that its top-1 token is well separated (runtime comparisons).
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = save_tiny_tokenizer(model_dir)
    config = BitNetConfig(
        vocab_size=len(tokenizer) + extra_vocab_rows,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        hidden_act=hidden_act,
    )
    torch.manual_seed(1234)
    model = BitNetForCausalLM(config)
    for name, param in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif embedding_std is not None and name.endswith("embed_tokens.weight"):
                param.normal_(0.0, embedding_std)
            elif head_std is not None and name == "lm_head.weight" and not tie_word_embeddings:
                param.normal_(0.0, head_std)
    if form == "float":
        model.save_pretrained(model_dir)
        return model_dir
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for i in range(num_layers):
        for proj in PROJECTIONS:
            key = f"model.layers.{i}.{proj}.weight"
            w_t, scale = quantize_weight(state[key])
            state[key] = pack_ternary(w_t)
            stored = scale if form == "packed" else 1.0 / scale
            state[key + "_scale"] = stored.reshape(1).to(torch.bfloat16 if form == "packed" else torch.float32)
    save_file(state, str(model_dir / "model.safetensors"))
    cfg = config.to_dict()
    cfg["architectures"] = ["BitNetForCausalLM"]
    cfg["quantization_config"] = {
        "quant_method": "bitnet",
        "linear_class": "autobitlinear" if form == "packed" else "bitlinear",
        "quantization_mode": "offline",
    }
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return model_dir


def rewrite_gguf(src: Path, dst: Path, set_fields: dict | None = None, drop_fields: tuple[str, ...] = (),
                 drop_tensors: tuple[str, ...] = ()) -> Path:
    """Copy a (non-I2_S) GGUF file with some metadata values replaced or dropped, or some tensors left out: files
    our exporter refuses to write (a config contradicting the tensors, a broken ``hf_config``), for the reader's
    refusal tests."""
    import gguf

    set_fields = set_fields or {}
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.get_field("general.architecture").contents())
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_fields:
            continue
        vtype = fld.types[0]
        sub_type = fld.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, set_fields.get(key, fld.contents()), vtype, sub_type=sub_type)
    for tensor in reader.tensors:
        if tensor.name in drop_tensors:
            continue
        kind = gguf.GGMLQuantizationType(int(tensor.tensor_type))
        if kind in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
            writer.add_tensor(tensor.name, np.asarray(tensor.data))
        else:
            writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
