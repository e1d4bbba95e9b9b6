"""BitNet b1.58 decoder (SPEC §4) as Transformers ``PreTrainedModel`` classes whose projections are ours.

The building blocks subclass Transformers' own ``models/bitnet`` modules: attention through Transformers'
attention interface (sdpa/eager/flex) with its ``Cache`` classes, RoPE, GQA, SubLN ``attn_sub_norm`` before
``o_proj`` and ``ffn_sub_norm`` before ``down_proj``, gated squared-ReLU MLP. The numerics are Transformers'
except for the seven projections per layer, which are:

* :class:`~bitnet_torch.nn.BitLinear` (trainable, float master weights) when
  ``config.quantization_config["quantization_mode"] == "online"``;
* :class:`~bitnet_torch.nn.PackedBitLinear` (uint8 codes + ``weight_scale``, no float weight ever) when it is
  ``"offline"``; ``linear_class`` picks the scale convention.

The attention and MLP ``forward`` restate Transformers' step for step, only so that the projections sharing
an input (q/k/v, gate/up) run as one grouped kernel call when they are packed (:func:`project_group`).

Loading and saving (``from_pretrained`` / ``save_pretrained``) are in :mod:`.checkpoint`; this file is the
architecture only.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, StaticCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.bitnet import modeling_bitnet as hf_bitnet
from transformers.utils.deprecation import deprecate_kwarg

from .. import ops
from ..nn import BitLinear, FastLinear, Int8Embedding, Int8Linear, PackedBitLinear, RMSNorm
from ..nn.lora_layers import PeftAdapterCompatMixin
from ..packing import VALUES_PER_BYTE
from .attention import apply_rotary, attend
from .configuration import BitNetConfig
from .engine import EngineCache, decode_path, engine_generate_kwargs

__all__ = [
    "BitNetAttention",
    "BitNetDecoderLayer",
    "BitNetForCausalLM",
    "BitNetMLP",
    "BitNetModel",
    "BitNetPreTrainedModel",
    "PROJECTION_NAMES",
    "projection_factory",
]

#: The seven ternary projections of each decoder layer (SPEC §1), as module-name suffixes.
PROJECTION_NAMES: tuple[str, ...] = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

LinearFactory = Callable[[int, int, bool], nn.Module]


def projection_factory(config: BitNetConfig) -> LinearFactory:
    """Return ``make(in_features, out_features, bias) -> module`` for the projections ``config`` describes."""
    if config.is_packed:
        convention = config.scale_convention

        def make_packed(in_features: int, out_features: int, bias: bool) -> nn.Module:
            return PackedBitLinear(in_features, out_features, bias=bias, scale_convention=convention)

        return make_packed

    def make_trainable(in_features: int, out_features: int, bias: bool) -> nn.Module:
        return BitLinear(in_features, out_features, bias=bias)

    return make_trainable


def project_group(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> list[torch.Tensor]:
    """``[layer(x) for layer in layers]``, computed by one grouped packed op when that gives the same numbers.

    When every layer is a plain :class:`PackedBitLinear` (no input RMSNorm, no hooks, not wrapped by an adapter),
    :func:`bitnet_torch.ops.ternary_linear_group` quantizes ``x`` once and streams all the weights in one
    parallel pass (the q/k/v and gate/up projections of a layer: 4 kernel calls per layer instead of 7); its
    outputs are bit-identical to the separate calls. Anything else (BitLinear, LoRA-wrapped layers, hooks)
    is called layer by layer.
    """
    module_hooks = torch.nn.modules.module
    if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
        return [layer(x) for layer in layers]  # global hooks expect to see every projection called
    groupable = all(
        type(layer) is PackedBitLinear
        and layer.rms_norm is None
        and not layer._forward_hooks
        and not layer._forward_pre_hooks
        for layer in layers
    )
    if not groupable or x.shape[-1] != layers[0].in_features:
        return [layer(x) for layer in layers]
    return ops.ternary_linear_group(
        x,
        [layer.weight for layer in layers],
        [layer.multiply_scale() for layer in layers],
        [layer.bias for layer in layers],
    )


class BitNetAttention(hf_bitnet.BitNetAttention):
    """Transformers' BitNet attention with our projections and RMSNorm.

    ``forward`` follows Transformers' ``BitNetAttention.forward`` step for step (RoPE, ``cache.update``, the
    configured attention interface, ``attn_sub_norm`` before ``o_proj``); the differences are that q, k and v
    come from :func:`project_group` (one grouped kernel call for packed projections) and that CPU ``sdpa``
    runs grouped-query attention inside SDPA (:func:`~bitnet_torch.models.attention.attend`).
    """

    def __init__(self, config: BitNetConfig, layer_idx: int, make_linear: LinearFactory):
        nn.Module.__init__(self)
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        q_out = config.num_attention_heads * self.head_dim
        kv_out = config.num_key_value_heads * self.head_dim
        self.q_proj = make_linear(config.hidden_size, q_out, config.attention_bias)
        self.k_proj = make_linear(config.hidden_size, kv_out, config.attention_bias)
        self.v_proj = make_linear(config.hidden_size, kv_out, config.attention_bias)
        self.o_proj = make_linear(q_out, config.hidden_size, config.attention_bias)
        self.attn_sub_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query, key, value = project_group(hidden_states, (self.q_proj, self.k_proj, self.v_proj))
        query_states = query.view(hidden_shape).transpose(1, 2)
        key_states = key.view(hidden_shape).transpose(1, 2)
        value_states = value.view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attn_output, attn_weights = attend(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.attn_sub_norm(attn_output)
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights


class BitNetMLP(hf_bitnet.BitNetMLP):
    """Gated MLP with the SubLN ``ffn_sub_norm`` before ``down_proj`` (SPEC §4).

    ``down(ffn_sub_norm(act(gate(x)) * up(x)))`` as in Transformers, with gate and up computed together by
    :func:`project_group`; ``act`` is ``config.hidden_act``: squared ReLU (``"relu2"``, BitNet b1.58) or SiLU
    (``"silu"``, the 1bitLLM-style BitNet that upstream llama.cpp's GGUF arch ``bitnet`` runs).
    """

    def __init__(self, config: BitNetConfig, make_linear: LinearFactory):
        nn.Module.__init__(self)
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.gate_proj = make_linear(self.hidden_size, self.intermediate_size, False)
        self.up_proj = make_linear(self.hidden_size, self.intermediate_size, False)
        self.down_proj = make_linear(self.intermediate_size, self.hidden_size, False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.ffn_sub_norm = RMSNorm(config.intermediate_size, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project_group(x, (self.gate_proj, self.up_proj))
        return self.down_proj(self.ffn_sub_norm(self.act_fn(gate) * up))


class BitNetDecoderLayer(hf_bitnet.BitNetDecoderLayer):
    """Pre-norm decoder layer: ``h += o_proj(sub_norm(attn(norm(h))))``; ``h += mlp(norm(h))`` (SPEC §4)."""

    def __init__(self, config: BitNetConfig, layer_idx: int, make_linear: LinearFactory):
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = BitNetAttention(config, layer_idx, make_linear)
        self.mlp = BitNetMLP(config, make_linear)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


def _random_packed_bytes(shape: tuple[int, int], device=None) -> torch.Tensor:
    """Random packed bytes: four independent codes uniform over {0, 1, 2} (ternary -1, 0, 1) per byte.

    Draws one number in [0, 81) per byte and looks its base-3 digits up (4x fewer random draws than one per code).
    """
    digits = torch.arange(81)
    table = torch.zeros(81, dtype=torch.uint8)
    for i in range(VALUES_PER_BYTE):
        table |= ((digits // 3**i) % 3).to(torch.uint8) << (2 * i)
    index = torch.randint(0, 81, shape, device=device)
    return table.to(index.device)[index]


def _fill_random_packed(layer: PackedBitLinear, std: float) -> None:
    """Random ternary codes (uniform over {-1, 0, 1}) with the scale a N(0, std) weight would get.

    Used to create models directly in packed form (benchmarks, tests) without any float weight.
    """
    mean_abs = std * math.sqrt(2.0 / math.pi)  # E|w| for w ~ N(0, std)
    scale = mean_abs if layer.scale_convention == "multiply" else 1.0 / mean_abs
    with torch.no_grad():
        layer.weight.copy_(_random_packed_bytes(tuple(layer.weight.shape), layer.weight.device))
        layer.weight_scale.fill_(scale)
        if layer.bias is not None:
            layer.bias.zero_()


def check_static_cache_capacity(model: nn.Module, inputs: torch.Tensor | None, kwargs: dict) -> None:
    """Raise ``ValueError`` when a ``StaticCache`` in ``kwargs`` cannot hold prompt + new tokens of this call."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if not isinstance(cache, StaticCache):
        return
    prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if prompt is None:
        return
    generation_config = kwargs.get("generation_config") or model.generation_config
    max_new_tokens = kwargs.get("max_new_tokens", generation_config.max_new_tokens)
    if max_new_tokens is not None:
        needed = prompt.shape[1] + max_new_tokens
    else:
        needed = kwargs.get("max_length", generation_config.max_length)
    capacity = cache.get_max_length()
    if needed is not None and capacity is not None and needed > capacity:
        raise ValueError(
            f"the static KV cache holds {capacity} positions but this generate() call needs {needed} "
            f"(prompt {prompt.shape[1]} + new tokens); build it for at least that many, e.g. "
            f"compiled_decode_kwargs(model, input_ids, max_new_tokens={needed - prompt.shape[1]})"
        )


class BitNetPreTrainedModel(PeftAdapterCompatMixin, hf_bitnet.BitNetPreTrainedModel):
    """Base class: our config class and the initialisation of packed / int8 layers."""

    config_class = BitNetConfig
    config: BitNetConfig

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, PackedBitLinear):
            if not getattr(module.weight, "_is_hf_initialized", False) and module.weight.device.type != "meta":
                _fill_random_packed(module, self.config.initializer_range or 0.02)
            if module.rms_norm is not None:
                super()._init_weights(module.rms_norm)
            return
        if isinstance(module, (Int8Linear, Int8Embedding)):
            return
        super()._init_weights(module)

    def _base_model(self) -> "BitNetModel":
        """The decoder stack (``self`` for :class:`BitNetModel`, ``self.model`` for the causal LM)."""
        return self if isinstance(self, BitNetModel) else self.model

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """The logical parameter count: what the float master form of this model holds, whatever form it is in.

        Transformers' count sees only ``nn.Parameter`` s; packed ternary weights are uint8 buffers holding four
        values a byte and int8 head/embedding weights are buffers too, so they are counted here as the values
        they stand for (``weight.numel() * 4`` for a packed projection, one per int8 element), and a tied
        head/embedding once. ``get_memory_footprint()`` still reports the bytes actually held.
        ``only_trainable``: only parameters with ``requires_grad`` (packed and int8 weights never are);
        ``exclude_embeddings``: without the input embedding (and a head tied to it), as in Transformers.
        """
        count = super().num_parameters(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
        if only_trainable:
            return count
        head, embed = getattr(self, "lm_head", None), self._base_model().embed_tokens
        tied = head is not None and self.config.tie_word_embeddings
        int8_weights: dict[int, tuple[nn.Module, torch.Tensor]] = {}
        for module in self.modules():
            if isinstance(module, PackedBitLinear):
                count += module.weight.numel() * VALUES_PER_BYTE
                count += module.bias.numel() if module.bias is not None else 0
            elif isinstance(module, (Int8Linear, Int8Embedding)):
                int8_weights.setdefault(id(module.weight), (module, module.weight))
        for module, weight in int8_weights.values():
            if exclude_embeddings and (module is embed or (tied and module is head)):
                continue
            count += weight.numel()
        if tied and head.weight is not embed.weight:
            # the tied matrix is held twice (an int8 copy beside the float one): count it once
            if not exclude_embeddings:
                count -= embed.weight.numel()
            elif isinstance(head, nn.Linear):
                count -= head.weight.numel()  # Transformers' count kept the float head: it is the embedding
        return count

    # -- construction ----------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: BitNetConfig, *, packed: bool | None = None, **kwargs) -> "BitNetForCausalLM":
        """Build a randomly initialised model; ``packed`` overrides the form the config describes.

        ``packed=True`` creates packed layers directly (random ternary codes, no float projection weight is
        ever allocated — e.g. the 2B-4T shape in ~0.5 GB). ``kwargs`` go to ``_from_config`` (``dtype=``).
        """
        config = copy.deepcopy(config)
        if not isinstance(config, BitNetConfig):
            config = BitNetConfig.from_dict(config.to_dict())
        if packed is not None and packed != config.is_packed:
            config.set_weight_form(packed)
        return cls._from_config(config, **kwargs)

    @classmethod
    def from_gguf(cls, path, **from_pretrained_kwargs):
        """Load a BitNet GGUF file (``i2_s``, ``tq2_0``, ``tq1_0`` or ``f16``) into a packed model.

        The ternary weights come back bit-exactly; a ``Q6_K`` ``token_embd`` comes back dequantized (lossy: not
        the exported values); see :func:`bitnet_torch.formats.gguf_reader.model_from_gguf`.
        """
        from ..formats.gguf_reader import model_from_gguf  # below models; imports gguf only when asked

        return model_from_gguf(path, cls, **from_pretrained_kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, packed: bool | None = None, **kwargs):
        """Load a BitNet checkpoint (local folder or hub id) through Transformers' ``from_pretrained``.

        * packed checkpoint (``quantization_mode: offline``; ``linear_class`` ``autobitlinear`` = multiply or
          ``bitlinear`` = divide) → packed layers, read from the memory-mapped file with no float copy;
        * master checkpoint (``online``) → trainable BitLinear, or with ``packed=True`` quantized and packed
          one tensor at a time while loading (the float model never exists as a whole).

        Every other ``from_pretrained`` keyword works as in Transformers (``dtype``, ``attn_implementation``,
        ``revision``, ``output_loading_info``, …), config fields can be overridden (``quantize_lm_head=True``),
        and ``from_pretrained(None, config=cfg, state_dict=sd)`` loads an in-memory state dict. As in
        Transformers, tensors the checkpoint lacks are initialised, warned about and listed in ``missing_keys``
        (a base-model checkpoint loads into the causal LM, its untied head initialised), unused ones in
        ``unexpected_keys``. Refuses, with :class:`~bitnet_torch.models.BitNetCheckpointError`: a config that
        is not ``model_type: bitnet`` / ``quant_method: bitnet`` or has impossible sizes, pickle-only weights,
        truncated/corrupt safetensors, shard indexes naming files outside the folder, tensors whose dtype/shape
        disagree with the config, a config declaring more layers than the files hold, half a packed pair,
        packed codes holding the invalid code 3 or a ``weight_scale`` that is not positive and finite, and
        ``packed=False`` on a packed checkpoint. ``use_safetensors=False`` and ``quantization_config=`` are refused.
        """
        from .checkpoint import load_pretrained

        return load_pretrained(cls, pretrained_model_name_or_path, *model_args, packed=packed, **kwargs)

    # -- saving ----------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory, *args, packed: bool | None = None, **kwargs) -> None:
        """Save config, generation config and weights (safetensors) in a form Transformers reads.

        ``packed=True``: Microsoft's packed layout (uint8 ``[N/4, K]`` + ``weight_scale``, multiply convention)
        with ``quantization_config {bitnet, autobitlinear, offline}`` — trainable models are quantized and
        packed on the way. ``packed=False``: float master weights with ``{bitnet, autobitlinear, online}``
        (refused for a packed model: its master weights are gone). ``None`` (default): the form the model
        holds. int8 head/embedding are written as float. Other keywords go to Transformers' ``save_pretrained``.
        With adapters attached by ``load_adapter``/``add_adapter``, only the active adapter is written (peft's
        format, as Transformers does).
        All or nothing: the checkpoint is written beside ``save_directory`` and replaces it in one step once
        complete (an existing directory keeps its other files, as in Transformers); a failed or killed save
        leaves the old checkpoint as it was. ``push_to_hub=True`` is refused (upload the saved folder instead).
        """
        from .checkpoint import save_pretrained

        if args:
            raise TypeError("save_pretrained takes only the directory positionally; pass other options by keyword")
        if getattr(self, "_hf_peft_config_loaded", False):
            # Adapters attached with load_adapter/add_adapter: Transformers saves the active adapter in peft's format.
            if packed is not None:
                raise ValueError("this model has adapters loaded: save_pretrained writes the adapter only (no packed=)")
            return super().save_pretrained(save_directory, **kwargs)
        save_pretrained(self, save_directory, packed=packed, **kwargs)

    # -- forms of the weights --------------------------------------------------------------------------

    @property
    def is_packed(self) -> bool:
        """True when the projections are packed ternary codes (inference only)."""
        return self.config.is_packed

    def pack(self) -> "BitNetForCausalLM":
        """Quantize and pack every BitLinear projection in place (one layer at a time); returns ``self``."""
        base = self._base_model()
        for name, module in base.projections():
            if isinstance(module, BitLinear):
                base.set_submodule(name, PackedBitLinear.from_bitlinear(module))
        self.config.set_weight_form(packed=True)
        return self

    def _apply_int8_options(self) -> None:
        """Make the embedding int8 when ``config.quantize_embedding`` says so (the causal LM also does the head)."""
        base = self._base_model()
        if self.config.quantize_embedding and not isinstance(base.embed_tokens, Int8Embedding):
            base.embed_tokens = Int8Embedding.from_embedding(base.embed_tokens)


class BitNetModel(BitNetPreTrainedModel, hf_bitnet.BitNetModel):
    """The decoder stack (embeddings → layers → final norm); ``forward`` is Transformers' ``BitNetModel.forward``."""

    def __init__(self, config: BitNetConfig, _quantization_config: dict | None = None):
        if _quantization_config is not None:  # set by from_pretrained, see BitNetForCausalLM.__init__
            config.quantization_config = dict(_quantization_config)
        config.check_sizes()
        BitNetPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        make_linear = projection_factory(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [BitNetDecoderLayer(config, layer_idx, make_linear) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = hf_bitnet.BitNetRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()
        if self.embed_tokens.weight.device.type != "meta":
            self._apply_int8_options()

    def projections(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of every ternary projection, in layer order (names relative to this module)."""
        return [
            (f"layers.{i}.{suffix}", layer.get_submodule(suffix))
            for i, layer in enumerate(self.layers)
            for suffix in PROJECTION_NAMES
        ]


class BitNetForCausalLM(BitNetPreTrainedModel, hf_bitnet.BitNetForCausalLM, GenerationMixin):
    """BitNet b1.58 causal LM: a Transformers ``PreTrainedModel`` + ``GenerationMixin`` with our projections.

    Construction:

    * ``BitNetForCausalLM(config)`` — projections as ``config.quantization_config`` says (online → trainable
      :class:`~bitnet_torch.nn.BitLinear`, offline → :class:`~bitnet_torch.nn.PackedBitLinear`), randomly
      initialised (packed layers get random ternary codes, never a float weight);
    * :meth:`from_config` ``(config, packed=True|False)`` — the same with the form chosen explicitly;
    * :meth:`from_pretrained` ``(path_or_hub_id, packed=None|True|False)`` — see there.

    ``forward`` / ``generate`` are Transformers' (KV cache, sdpa/eager attention, left padding, sampling).
    :meth:`save_pretrained` ``(path, packed=None|True|False)`` writes the packed (Microsoft layout) or the
    master form. :meth:`pack` turns a trainable model into a packed one in place. ``config.quantize_lm_head``
    / ``config.quantize_embedding`` (or :meth:`quantize_output_layers`) switch the head / embedding to int8.
    """

    def __init__(self, config: BitNetConfig, _quantization_config: dict | None = None):
        # ``_quantization_config`` is passed by ``from_pretrained`` only: during that call the config carries
        # ``quantization_config=None`` so that Transformers builds no quantizer (see ``checkpoint.py``).
        if _quantization_config is not None:
            config.quantization_config = dict(_quantization_config)
        BitNetPreTrainedModel.__init__(self, config)
        self.model = BitNetModel(config)
        self.vocab_size = config.vocab_size
        # A tied head gets the embedding's Parameter in post_init(): do not allocate a matrix only to drop it.
        head_device = "meta" if config.tie_word_embeddings else None
        # FastLinear: an nn.Linear (same key lm_head.weight) whose CPU decode streams the weight at memory bandwidth.
        self.lm_head = FastLinear(config.hidden_size, config.vocab_size, bias=False, device=head_device)
        self.post_init()
        if self.model.embed_tokens.weight.device.type != "meta":
            self._apply_int8_options()

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """Transformers' ``generate()`` on the decode engine when it applies, refusing up front a static KV cache too
        short for the request.

        Decode engine (:mod:`bitnet_torch.models.engine`): used by default when :func:`~.engine.engine_supported`
        says the model can (CPU, packed projections, no hooks/adapters) and the request allows it (greedy or
        sampling, no beam search, no attention / hidden-state outputs, no cache of your own, a 2-D 0/1 attention
        mask); everything else takes the eager path. ``use_decode_engine=False`` (or ``BITNET_TORCH_ENGINE=0``)
        forces the eager path; ``use_decode_engine=True`` raises when the engine cannot be used.

        A ``StaticCache`` passed as ``cache=`` (e.g. by :func:`~bitnet_torch.models.compiled_decode_kwargs`)
        holds a fixed number of positions; writing past them fails deep inside a kernel with an index error,
        so the prompt length plus ``max_new_tokens`` (or ``max_length``) is checked against it first.
        """
        check_static_cache_capacity(self, inputs, kwargs)
        use_engine = kwargs.pop("use_decode_engine", None)
        if use_engine is not False:
            extra = engine_generate_kwargs(self, inputs, args, kwargs)
            if extra is None and use_engine:
                raise ValueError("use_decode_engine=True but this model or request cannot use the decode engine")
            if extra is not None:
                kwargs.update(extra)
        return super().generate(inputs, *args, **kwargs)

    def decode_path(self) -> tuple[str, str]:
        """``("engine" | "eager", reason)``: the decode path :meth:`generate` takes by default for this model."""
        return decode_path(self)

    @functools.wraps(hf_bitnet.BitNetForCausalLM.forward)  # keeps the signature generate() inspects
    def forward(self, *args, **kwargs):
        """Transformers' forward; a step of ``generate()`` on the decode engine when its cache is an ``EngineCache``."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and not args and isinstance(cache, EngineCache):
            return cache.forward(kwargs.pop("input_ids", None), kwargs.pop("attention_mask", None), **kwargs)
        return super().forward(*args, **kwargs)

    def quantize_output_layers(self, lm_head: bool = True, embedding: bool = False) -> "BitNetForCausalLM":
        """Switch the output head (and optionally the input embedding) to int8 per row; returns ``self``.

        With tied embeddings and both switched, the head and the embedding share one int8 tensor. Inference
        only (the int8 tensors get no gradient); :meth:`save_pretrained` writes them back as float.
        """
        self.config.quantize_lm_head = lm_head
        self.config.quantize_embedding = embedding
        self._apply_int8_options()
        return self

    def _apply_int8_options(self) -> None:
        """Make the head / embedding int8 as ``config.quantize_lm_head`` / ``quantize_embedding`` say."""
        head, embed = self.config.quantize_lm_head, self.config.quantize_embedding
        if not (head or embed):
            return
        if head and not isinstance(self.lm_head, Int8Linear):
            self.lm_head = Int8Linear.from_linear(self.lm_head)
        if embed and not isinstance(self.model.embed_tokens, Int8Embedding):
            tied = self.config.tie_word_embeddings and isinstance(self.lm_head, Int8Linear)
            self.model.embed_tokens = Int8Embedding.from_embedding(
                self.model.embed_tokens, shared=self.lm_head if tied else None
            )
        # The int8 modules hold buffers, not the tied float Parameter: Transformers must not re-tie them.
        self.all_tied_weights_keys = {}
