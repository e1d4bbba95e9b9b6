"""Model size presets for training from scratch, from a few million parameters to the 2B-4T shape.

Every preset is the BitNet b1.58 architecture (SPEC §4: SubLN norms, gated squared-ReLU MLP, RoPE, GQA,
tied embeddings, no biases); only the sizes differ. The vocabulary comes from the tokenizer, except in
``"2b"``, which is the published ``bitnet-b1.58-2B-4T`` shape with its Llama-3 vocabulary.
``hidden_size`` and ``intermediate_size`` (every projection's row length) are multiples of 256, so that a
trained model exports to every GGUF type (TQ1_0/TQ2_0 store rows in 256-value blocks, I2_S in 128)
without an F16 fallback. ``hidden_act`` is BitNet b1.58's ``"relu2"``; ``"silu"`` gives the 1bitLLM-style
FFN that upstream llama.cpp's ``bitnet`` architecture computes (pass it as a model override).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["GGUF_ROW_MULTIPLE", "ModelPreset", "PRESETS", "get_preset", "count_parameters"]


@dataclass(frozen=True)
class ModelPreset:
    """Architecture sizes of one preset (the keyword arguments of ``BitNetConfig``)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 2048
    rope_theta: float = 500000.0
    vocab_size: int | None = None  # None: the tokenizer's
    hidden_act: str = "relu2"  # "silu": the 1bitLLM-style FFN (upstream llama.cpp's GGUF arch "bitnet")
    description: str = ""

    def config_kwargs(self, vocab_size: int | None = None) -> dict:
        """``BitNetConfig`` keyword arguments; ``vocab_size`` is required when the preset has none."""
        kwargs = asdict(self)
        kwargs.pop("description")
        kwargs.pop("rope_theta")
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        vocab = self.vocab_size or vocab_size
        if vocab is None:
            raise ValueError("this preset takes its vocabulary from the tokenizer: pass vocab_size")
        kwargs["vocab_size"] = vocab
        return kwargs


PRESETS: dict[str, ModelPreset] = {
    "5m": ModelPreset(256, 512, 5, 4, 2, max_position_embeddings=1024, description="4.0M with a 4096 vocab (5.05M with 8192): the CPU demo"),
    "15m": ModelPreset(512, 1536, 4, 8, 2, max_position_embeddings=1024, description="14.2M with a 4096 vocab"),
    "100m": ModelPreset(768, 2048, 12, 12, 4, description="100M with a 32000 vocab"),
    "300m": ModelPreset(1024, 2816, 24, 16, 4, description="303M with a 32000 vocab"),
    "650m": ModelPreset(1536, 4096, 24, 24, 6, description="644M with a 32000 vocab (the paper's 700M uses LR 1.5e-3)"),
    "1.1b": ModelPreset(2048, 5632, 24, 32, 8, description="1.15B with a 32000 vocab"),
    "2b": ModelPreset(
        2560, 6912, 30, 20, 5, max_position_embeddings=4096, vocab_size=128256,
        description="the bitnet-b1.58-2B-4T shape: 2.41B parameters with its 128256-token vocabulary",
    ),
}

#: Every projection row length is a multiple of this (the TQ1_0/TQ2_0 block of GGUF; I2_S needs 128).
GGUF_ROW_MULTIPLE = 256


def get_preset(name: str) -> ModelPreset:
    """The preset called ``name``; ``ValueError`` listing the known ones otherwise."""
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def count_parameters(preset: ModelPreset, vocab_size: int | None = None) -> int:
    """Parameter count of the model a preset builds (tied embeddings counted once), without building it."""
    vocab = preset.vocab_size or vocab_size
    if vocab is None:
        raise ValueError("pass vocab_size for a preset without its own vocabulary")
    h, f = preset.hidden_size, preset.intermediate_size
    head_dim = h // preset.num_attention_heads
    kv = preset.num_key_value_heads * head_dim
    attention = 2 * h * h + 2 * h * kv + h  # q, o, k, v + attn_sub_norm (width h)
    mlp = 3 * h * f + f  # gate, up, down; ffn_sub_norm
    norms = 2 * h
    return vocab * h + preset.num_hidden_layers * (attention + mlp + norms) + h
