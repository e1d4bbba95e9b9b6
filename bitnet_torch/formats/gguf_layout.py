"""The BitNet GGUF layout shared by the reader (below ``models``) and the writer (``export``).

Tensor names and metadata keys follow llama.cpp's ``BitnetModel`` converter (``convert_hf_to_gguf.py``):
``blk.{i}.attn_sub_norm`` / ``ffn_sub_norm`` and the usual Llama names. Our own keys
(``bitnet_torch.*``) carry the checkpoint's ``config.json`` and the exact per-tensor scales; runtimes
ignore them.

What each runtime computes for a GGUF architecture name (checked with the runtimes themselves,
``tests/test_native_interop.py``); the FFN activation is not a GGUF key, each runtime's graph fixes it:

=================  ===============================  ==========================  ====================
arch               FFN activation (hard-coded)      bitnet.cpp                  upstream llama.cpp
=================  ===============================  ==========================  ====================
``bitnet``         SiLU (1bitLLM-style models)      i2_s, tq2_0, tq1_0, f16     tq2_0, tq1_0, f16
``bitnet-b1.58``   squared ReLU (BitNet b1.58 2B4T) i2_s, tq2_0, tq1_0, f16     (unknown arch)
``bitnet-25``      squared ReLU                     i2_s, tq2_0, tq1_0, f16     (unknown arch)
=================  ===============================  ==========================  ====================
"""

from __future__ import annotations

import re

import gguf

__all__ = [
    "ARCH_ACTIVATION",
    "ARCH_FOR_ACTIVATION",
    "GGUF_ARCHITECTURES",
    "GGUF_EMBEDDING_TYPES",
    "GGUF_TYPES",
    "KEY_HF_CONFIG",
    "KEY_SCALES",
    "KEY_SCALE_NAMES",
    "PRE_TOKENIZER_REGEXES",
    "GGUFError",
    "check_config_against_shapes",
    "gguf_to_hf_name",
    "hf_to_gguf_name",
    "is_projection",
    "normalize_activation",
    "runtimes_for",
]

#: The ternary storage types a BitNet GGUF holds (and :func:`bitnet_torch.export.export_gguf` writes).
GGUF_TYPES: tuple[str, ...] = ("i2_s", "tq2_0", "tq1_0", "f16")
#: Storage of ``token_embd`` (the tied head) and an untied ``output``: F16, F32, or ggml's lossy 6.56-bit ``Q6_K``.
GGUF_EMBEDDING_TYPES: tuple[str, ...] = ("f16", "f32", "q6_k")
#: Architecture names: ``bitnet`` (llama.cpp and bitnet.cpp); ``bitnet-b1.58`` / ``bitnet-25`` (bitnet.cpp only).
GGUF_ARCHITECTURES: tuple[str, ...] = ("bitnet", "bitnet-b1.58", "bitnet-25")
#: The FFN activation each architecture's graph hard-codes, in both runtimes.
ARCH_ACTIVATION: dict[str, str] = {"bitnet": "silu", "bitnet-b1.58": "relu2", "bitnet-25": "relu2"}
#: The architecture written for a model's activation by default.
ARCH_FOR_ACTIVATION: dict[str, str] = {"silu": "bitnet", "relu2": "bitnet-b1.58"}
#: Which runtime loads which architecture / which tensor type.
_ARCH_RUNTIMES: dict[str, tuple[str, ...]] = {
    "bitnet": ("bitnet.cpp", "llama.cpp"),
    "bitnet-b1.58": ("bitnet.cpp",),
    "bitnet-25": ("bitnet.cpp",),
}
_TYPE_RUNTIMES: dict[str, tuple[str, ...]] = {
    "i2_s": ("bitnet.cpp",),  # type 36 is not an upstream ggml type
    "tq2_0": ("bitnet.cpp", "llama.cpp"),
    "tq1_0": ("bitnet.cpp", "llama.cpp"),
    "f16": ("bitnet.cpp", "llama.cpp"),
}
#: Transformers ``hidden_act`` spellings of the two activations the runtimes implement.
_ACTIVATION_NAMES: dict[str, str] = {"relu2": "relu2", "silu": "silu", "swish": "silu"}

#: Pre-tokenizer regexes llama.cpp knows, by its ``tokenizer.ggml.pre`` name (written by export, read back by
#: :mod:`.gguf_tokenizer`).
PRE_TOKENIZER_REGEXES: dict[str, str] = {
    "llama-bpe": (
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
        "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
    ),
    "gpt-2": "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+",
}

KEY_HF_CONFIG = "bitnet_torch.hf_config"
KEY_SCALE_NAMES = "bitnet_torch.ternary.names"
KEY_SCALES = "bitnet_torch.ternary.scales"


class GGUFError(ValueError):
    """A GGUF export or import was refused: the message names the file, tensor, key or option at fault."""


def normalize_activation(hidden_act: str | None) -> str:
    """``"relu2"`` or ``"silu"`` for a Transformers ``hidden_act`` (``None``: BitNet b1.58's ``relu2``); else as given."""
    name = "relu2" if hidden_act is None else str(hidden_act)
    return _ACTIVATION_NAMES.get(name, name)


def runtimes_for(gguf_type: str, arch: str) -> tuple[str, ...]:
    """The runtimes (``"bitnet.cpp"``, ``"llama.cpp"``) that load a file of this type and architecture."""
    return tuple(r for r in _ARCH_RUNTIMES.get(arch, ()) if r in _TYPE_RUNTIMES.get(gguf_type, ()))


_T = gguf.MODEL_TENSOR
_LAYER_TENSORS: dict[str, gguf.MODEL_TENSOR] = {
    "input_layernorm": _T.ATTN_NORM,
    "self_attn.q_proj": _T.ATTN_Q,
    "self_attn.k_proj": _T.ATTN_K,
    "self_attn.v_proj": _T.ATTN_V,
    "self_attn.o_proj": _T.ATTN_OUT,
    "self_attn.attn_sub_norm": _T.ATTN_SUB_NORM,
    "post_attention_layernorm": _T.FFN_NORM,
    "mlp.gate_proj": _T.FFN_GATE,
    "mlp.up_proj": _T.FFN_UP,
    "mlp.down_proj": _T.FFN_DOWN,
    "mlp.ffn_sub_norm": _T.FFN_SUB_NORM,
}
_GLOBAL_TENSORS: dict[str, gguf.MODEL_TENSOR] = {
    "model.embed_tokens": _T.TOKEN_EMBD,
    "model.norm": _T.OUTPUT_NORM,
    "lm_head": _T.OUTPUT,
}
_HF_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
_GGUF_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)\.weight$")
_GGUF_LAYER_SUFFIX = {gguf.TENSOR_NAMES[kind].format(bid=0)[len("blk.0."):]: hf for hf, kind in _LAYER_TENSORS.items()}
_GGUF_GLOBAL = {gguf.TENSOR_NAMES[kind] + ".weight": hf + ".weight" for hf, kind in _GLOBAL_TENSORS.items()}
_PROJECTION = re.compile(r"\.(attn_[qkv]|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")


def hf_to_gguf_name(name: str) -> str | None:
    """GGUF tensor name of a Transformers BitNet tensor name (``None`` when it has no GGUF counterpart)."""
    match = _HF_LAYER_NAME.match(name)
    if match is not None:
        kind = _LAYER_TENSORS.get(match.group(2))
        return None if kind is None else gguf.TENSOR_NAMES[kind].format(bid=int(match.group(1))) + ".weight"
    if name.endswith(".weight") and name[: -len(".weight")] in _GLOBAL_TENSORS:
        return gguf.TENSOR_NAMES[_GLOBAL_TENSORS[name[: -len(".weight")]]] + ".weight"
    return None


def gguf_to_hf_name(name: str) -> tuple[str, int | None] | None:
    """``(Transformers name, layer index or None)`` of a GGUF BitNet tensor name; ``None`` if not BitNet's."""
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name], None
    match = _GGUF_LAYER_NAME.match(name)
    if match is None or match.group(2) not in _GGUF_LAYER_SUFFIX:
        return None
    layer = int(match.group(1))
    return f"model.layers.{layer}.{_GGUF_LAYER_SUFFIX[match.group(2)]}.weight", layer


def is_projection(gguf_name: str) -> bool:
    """True for the seven ternary projections of a layer (``attn_q`` … ``ffn_down``)."""
    return _PROJECTION.search(gguf_name) is not None


def _positive_int(config: dict, key: str, source: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if value is None:
        raise GGUFError(f"{source} has no {key!r}: not a Llama-style BitNet configuration")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise GGUFError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def check_config_against_shapes(config: dict, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Refuse a config whose sizes contradict the tensors (Transformers names, ``[out, in]`` shapes).

    Checks, before anything is allocated from the config: the number of layers (the layer indices
    present must be exactly ``0 .. num_hidden_layers-1``), ``hidden_size``, ``vocab_size``,
    ``intermediate_size``, the attention heads (``q_proj``) and the KV heads (``k_proj`` / ``v_proj``),
    and that every tensor of every layer is present. ``source`` names the config in the message.
    Raises :class:`GGUFError` naming the field and the tensor that disagree.
    """
    layers = _positive_int(config, "num_hidden_layers", source)
    hidden = _positive_int(config, "hidden_size", source)
    vocab = _positive_int(config, "vocab_size", source)
    inter = _positive_int(config, "intermediate_size", source)
    heads = _positive_int(config, "num_attention_heads", source)
    kv_heads = _positive_int(config, "num_key_value_heads", source, default=heads)
    head_dim = config.get("head_dim") or hidden // heads
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise GGUFError(f"{source}: head_dim must be a positive integer, got {head_dim!r}")
    present = {match.group(1) for name in shapes if (match := _HF_LAYER_NAME.match(name))}
    indices = sorted(int(i) for i in present)
    if len(indices) != layers or (indices and indices[-1] != layers - 1):
        raise GGUFError(
            f"{source} says num_hidden_layers={layers} but the tensors hold {len(indices)} layers"
            + (f" (indices {indices[0]}..{indices[-1]})" if indices else "")
        )
    expected: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if "lm_head.weight" in shapes:
        expected["lm_head.weight"] = (vocab, hidden)
    why = {
        "model.embed_tokens.weight": "vocab_size, hidden_size",
        "lm_head.weight": "vocab_size, hidden_size",
        "model.norm.weight": "hidden_size",
    }
    per_layer = {
        "input_layernorm": ((hidden,), "hidden_size"),
        "self_attn.q_proj": ((heads * head_dim, hidden), "num_attention_heads * head_dim, hidden_size"),
        "self_attn.k_proj": ((kv_heads * head_dim, hidden), "num_key_value_heads * head_dim, hidden_size"),
        "self_attn.v_proj": ((kv_heads * head_dim, hidden), "num_key_value_heads * head_dim, hidden_size"),
        "self_attn.o_proj": ((hidden, heads * head_dim), "hidden_size, num_attention_heads * head_dim"),
        "self_attn.attn_sub_norm": ((hidden,), "hidden_size"),
        "post_attention_layernorm": ((hidden,), "hidden_size"),
        "mlp.gate_proj": ((inter, hidden), "intermediate_size, hidden_size"),
        "mlp.up_proj": ((inter, hidden), "intermediate_size, hidden_size"),
        "mlp.down_proj": ((hidden, inter), "hidden_size, intermediate_size"),
        "mlp.ffn_sub_norm": ((inter,), "intermediate_size"),
    }
    for i in indices:
        for suffix, (shape, fields) in per_layer.items():
            name = f"model.layers.{i}.{suffix}.weight"
            expected[name] = shape
            why[name] = fields
    for name, shape in expected.items():
        if name not in shapes:
            raise GGUFError(f"tensor {name} is missing ({source} describes it)")
        if tuple(shapes[name]) != shape:
            raise GGUFError(
                f"{name} has shape {list(shapes[name])} but {source} implies {list(shape)} ({why[name]}): "
                "the config contradicts the weights"
            )
