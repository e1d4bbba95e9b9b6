"""``BitNetConfig``: the architecture facts of a BitNet b1.58 model plus how its weights are held.

It subclasses Transformers' own ``BitNetConfig`` (``model_type = "bitnet"``, same fields and defaults,
``rope_parameters``, ``tie_word_embeddings``), so a ``config.json`` we write is read by plain Transformers
and a Microsoft ``config.json`` is read by us. What we add:

* ``quantization_config`` is always present and always a plain dict
  ``{"quant_method": "bitnet", "linear_class": ..., "quantization_mode": ...}`` describing the weights the
  model *currently holds*: ``"online"`` = float master weights in trainable :class:`~bitnet_torch.nn.BitLinear`,
  ``"offline"`` = packed ternary codes in :class:`~bitnet_torch.nn.PackedBitLinear` (``linear_class`` says what
  ``weight_scale`` means: ``"autobitlinear"`` multiply, ``"bitlinear"`` divide; SPEC §3).
  A config without one is taken to describe float master weights (``online``).
* ``quantize_lm_head`` (default False): run the output head as int8 per output channel
  (:class:`~bitnet_torch.nn.Int8Linear`); logits then differ slightly from Transformers'.
* ``hidden_act`` is ``"relu2"`` (squared ReLU) in BitNet b1.58 (Microsoft's 2B-4T, bitnet.cpp's GGUF arch
  ``bitnet-b1.58``); ``"silu"`` is the 1bitLLM-style BitNet FFN (upstream llama.cpp's GGUF arch ``bitnet``) and
  what :func:`~bitnet_torch.models.convert_llama_to_bitnet` keeps from a Llama. Any Transformers activation
  name (``ACT2FN``) is accepted; an unknown one is refused when the config is built.
* ``quantize_embedding`` (default False): hold the input embedding as int8 rows × fp32 scale; with tied
  embeddings and ``quantize_lm_head`` the two share one int8 tensor.

Both int8 options are runtime forms: checkpoints always store the float embedding / head.
"""

from __future__ import annotations

from typing import Any

from transformers import BitNetConfig as _TransformersBitNetConfig
from transformers.utils.quantization_config import QuantizationConfigMixin

__all__ = [
    "BitNetConfig",
    "MASTER_QUANTIZATION_CONFIG",
    "PACKED_QUANTIZATION_CONFIG",
    "QUANT_METHOD",
    "bitnet_b1_58_2b_4t_config",
    "normalize_quantization_config",
]

#: ``quantization_config.quant_method`` of every BitNet checkpoint.
QUANT_METHOD = "bitnet"
#: What we write for packed checkpoints: Microsoft's published 2B-4T form (SPEC §3).
PACKED_QUANTIZATION_CONFIG: dict[str, str] = {
    "quant_method": QUANT_METHOD,
    "linear_class": "autobitlinear",
    "quantization_mode": "offline",
}
#: What we write for float master checkpoints: Microsoft's ``-bf16`` form (SPEC §3).
MASTER_QUANTIZATION_CONFIG: dict[str, str] = {
    "quant_method": QUANT_METHOD,
    "linear_class": "autobitlinear",
    "quantization_mode": "online",
}

_LINEAR_CLASSES = ("autobitlinear", "bitlinear")
#: Architecture sizes that must be positive integers (:meth:`BitNetConfig.check_sizes`).
_POSITIVE_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "max_position_embeddings")
_MODES = ("online", "offline")


def normalize_quantization_config(value: Any) -> dict[str, Any]:
    """Return a BitNet ``quantization_config`` as a plain, validated dict.

    Accepts ``None`` (→ the master/online config), a dict or a Transformers ``QuantizationConfigMixin``
    (e.g. ``BitNetQuantConfig``). Raises ``ValueError`` for another ``quant_method``, an unknown
    ``linear_class`` or ``quantization_mode``, or ``use_rms_norm=True`` (not the SubLN architecture).
    """
    if value is None:
        return dict(MASTER_QUANTIZATION_CONFIG)
    if isinstance(value, QuantizationConfigMixin):
        value = value.to_dict()
    if not isinstance(value, dict):
        raise TypeError(f"quantization_config must be a dict or a QuantizationConfigMixin, got {type(value).__name__}")
    config = dict(value)
    quant_method = str(config.get("quant_method", ""))
    if quant_method != QUANT_METHOD:
        raise ValueError(
            f"quantization_config.quant_method is {quant_method!r}, but a BitNet b1.58 checkpoint has "
            f"{QUANT_METHOD!r}: this checkpoint is quantized with another method and is not a BitNet model"
        )
    config["quant_method"] = QUANT_METHOD
    # Transformers' BitNetQuantConfig defaults (linear_class "bitlinear", mode "offline").
    config.setdefault("linear_class", "bitlinear")
    config.setdefault("quantization_mode", "offline")
    if config["linear_class"] not in _LINEAR_CLASSES:
        raise ValueError(f"quantization_config.linear_class must be one of {_LINEAR_CLASSES}, got {config['linear_class']!r}")
    if config["quantization_mode"] not in _MODES:
        raise ValueError(
            f"quantization_config.quantization_mode must be one of {_MODES}, got {config['quantization_mode']!r}"
        )
    if config.get("use_rms_norm"):
        raise ValueError(
            "quantization_config.use_rms_norm=True (an RMSNorm inside every BitLinear) is not the SubLN "
            "architecture of BitNetForCausalLM; build such models with bitnet_torch.convert_to_bitnet(use_rms_norm=True)"
        )
    return config


def _check_hidden_act(hidden_act: Any) -> None:
    """Refuse an FFN activation Transformers does not know (else the model fails later with a bare KeyError)."""
    from transformers.activations import ACT2FN

    if not isinstance(hidden_act, str) or hidden_act not in ACT2FN:
        raise ValueError(
            f"hidden_act={hidden_act!r} is not a Transformers activation; BitNet models use 'relu2' (BitNet b1.58) "
            "or 'silu' (1bitLLM style, what upstream llama.cpp's GGUF arch 'bitnet' computes)"
        )


class BitNetConfig(_TransformersBitNetConfig):
    """Configuration of :class:`~bitnet_torch.models.BitNetForCausalLM` (a Transformers ``BitNetConfig``).

    Every Transformers ``BitNetConfig`` argument is accepted with the same default; in addition
    ``quantize_lm_head`` and ``quantize_embedding`` (see the module docstring) and ``quantization_config``
    (normalised by :func:`normalize_quantization_config`). Use :attr:`is_packed` / :attr:`scale_convention`
    rather than reading the dict by hand.
    """

    model_type = "bitnet"

    quantize_lm_head: bool = False
    quantize_embedding: bool = False

    def __post_init__(self, **kwargs):
        quantization_config = normalize_quantization_config(kwargs.pop("quantization_config", None))
        super().__post_init__(**kwargs)
        self.quantization_config = quantization_config
        _check_hidden_act(self.hidden_act)
        self.check_sizes()

    def check_sizes(self) -> None:
        """Raise ``ValueError`` naming the field when the architecture sizes cannot describe a model.

        Every size must be a positive integer, ``hidden_size`` a multiple of ``num_attention_heads`` (unless
        ``head_dim`` is given), ``num_attention_heads`` a multiple of ``num_key_value_heads`` (grouped-query
        attention) and the head dimension even (RoPE rotates pairs). Cheap: no size is iterated over, so an
        absurd ``num_hidden_layers`` costs nothing here (it is checked against the checkpoint's tensors when
        loading, see :mod:`.checkpoint`).
        """
        for name in _POSITIVE_SIZES:
            value = getattr(self, name, None)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"config.{name} must be a positive integer, got {value!r}")
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        head_dim = getattr(self, "head_dim", None)
        if head_dim is not None:
            if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
                raise ValueError(f"config.head_dim must be a positive integer, got {head_dim!r}")
        elif self.hidden_size % heads:
            raise ValueError(
                f"config.hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads ({heads})"
            )
        else:
            head_dim = self.hidden_size // heads
        if heads % kv_heads:
            raise ValueError(
                f"config.num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
            )
        if head_dim % 2:
            raise ValueError(f"the head dimension ({head_dim}) must be even (rotary embeddings rotate pairs)")
        eps = self.rms_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
            raise ValueError(f"config.rms_norm_eps must be a positive finite number, got {eps!r}")

    @property
    def is_packed(self) -> bool:
        """True when the projections are packed ternary codes (``quantization_mode == "offline"``)."""
        return self.quantization_config["quantization_mode"] == "offline"

    @property
    def scale_convention(self) -> str:
        """``"multiply"`` (autobitlinear) or ``"divide"`` (bitlinear): what a packed ``weight_scale`` means."""
        from ..nn import LINEAR_CLASS_TO_CONVENTION

        return LINEAR_CLASS_TO_CONVENTION[self.quantization_config["linear_class"]]

    def set_weight_form(self, packed: bool) -> None:
        """Record that the model now holds packed codes (multiply convention) or float master weights."""
        self.quantization_config = dict(PACKED_QUANTIZATION_CONFIG if packed else MASTER_QUANTIZATION_CONFIG)

    def to_diff_dict(self) -> dict[str, Any]:
        """Like Transformers', but always writes the fields whose defaults differ between model families.

        Plain Transformers fills absent keys with *its* ``BitNetConfig`` defaults, so the architecture-critical
        fields are always written explicitly.
        """
        output = super().to_diff_dict()
        for key in ("tie_word_embeddings", "max_position_embeddings", "rope_parameters", "num_key_value_heads",
                    "rms_norm_eps", "hidden_act", "vocab_size", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads", "quantize_lm_head", "quantize_embedding"):
            output[key] = getattr(self, key)
        output["quantization_config"] = dict(self.quantization_config)
        return output


def bitnet_b1_58_2b_4t_config(**overrides: Any) -> BitNetConfig:
    """The architecture of ``microsoft/bitnet-b1.58-2B-4T`` (SPEC §4), packed form; ``overrides`` replace fields."""
    values: dict[str, Any] = dict(
        vocab_size=128256,
        hidden_size=2560,
        intermediate_size=6912,
        num_hidden_layers=30,
        num_attention_heads=20,
        num_key_value_heads=5,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
        quantization_config=dict(PACKED_QUANTIZATION_CONFIG),
    )
    values.update(overrides)
    return BitNetConfig(**values)
