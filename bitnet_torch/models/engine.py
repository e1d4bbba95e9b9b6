"""A decode engine for packed BitNet models on CPU: whole forward steps in one op, batched, with its own KV cache.

Why (issue 12): a token of eager ``generate()`` is ~120 projection kernel calls, each with its own fork/join of
the thread pool and the memory stream ramping up again, plus Python, norms, rotary, cache bookkeeping and attention
as separate framework ops between them. :class:`DecodeEngine` runs a whole step -- every layer and the head, for
a batch of sequences -- as ONE call of ``torch.ops.bitnet.decode_step`` (``csrc/cpu/decode_engine.cpp``: one
OpenMP parallel region, barriers between phases, each weight byte read once per step for all sequences). It holds
no copy of the model's weights: the op reads the packed projections, the head and the embedding in place.

Interface (the server codes against exactly this)::

    engine = DecodeEngine(model, max_batch_size=8, max_seq_len=2048)
    slot = engine.allocate()
    logits = engine.prefill(slot, prompt_ids)         # fp32 [vocab] after the last prompt token
    logits = engine.decode([slot, other], [tok, tok2])  # fp32 [2, vocab], one token appended per slot
    engine.release(slot)

A slot's logits are bitwise identical whether it is decoded alone or together with any other slots in any order
(per-row quantization, exact int32 accumulation, per-sequence attention: nothing in a row depends on another row).
Numbers: those of the eager model (same kernels, same roundings to the model dtype after every op), except the
attention's fp32 sums, which run in another order than SDPA's kernel (float rounding).

:func:`engine_supported` says whether a model can use it; ``BitNetForCausalLM.generate()`` uses it automatically
through :class:`EngineCache` when the request allows (see :func:`engine_generate_kwargs`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch import nn
from transformers.cache_utils import Cache

from .. import ops
from .._memory import release_freed_memory
from ..nn import FastLinear, Int8Embedding, Int8Linear, PackedBitLinear, RMSNorm

__all__ = ["DecodeEngine", "EngineCache", "engine_supported", "engine_generate_kwargs", "decode_path", "ENGINE_ENV"]

logger = logging.getLogger(__name__)

#: ``BITNET_TORCH_ENGINE=0`` turns the engine off for ``generate()`` (everything goes through the eager path).
ENGINE_ENV = "BITNET_TORCH_ENGINE"
#: Rows per engine call during prefill (bounds the step buffers: ~55 KB per row for the 2B-4T shape).
PREFILL_CHUNK = 256
#: A prompt of at least this many tokens into an empty slot is prefilled by the model's own forward (measured
#: faster: SDPA's vectorised causal attention beats the engine's per-row attention for many tokens; 2B-4T pp128,
#: 1 thread: 177 vs 123 tokens/s) and its keys/values are copied into the engine's cache.
PREFILL_WITH_MODEL_MIN = 16
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ROPE_TYPES = ("default", "linear", "llama3")


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or getattr(module, "_forward_hooks_with_kwargs", None)
    )


def engine_supported(model: nn.Module) -> tuple[bool, str]:
    """Whether :class:`DecodeEngine` can run ``model`` with the eager model's numbers, and why (not).

    Needs: our ``BitNetForCausalLM`` on CPU; every projection a plain :class:`PackedBitLinear` (no bias, no input
    norm, no adapter around it); relu^2 MLP; float or int8 embedding; float (bf16/fp32) or int8 head without bias;
    model dtype fp32/bf16/fp16; a position-only rotary embedding; no forward hooks anywhere (global or on a module),
    no peft adapters. The compiled extension is used when loaded, else the pure-PyTorch reference of the op.
    """
    from .modeling import BitNetForCausalLM  # here, not at the top: modeling imports this module

    if not isinstance(model, BitNetForCausalLM):
        return False, f"not a bitnet_torch BitNetForCausalLM ({type(model).__name__})"
    config = model.config
    if getattr(model, "_hf_peft_config_loaded", False) or getattr(model, "peft_config", None):
        return False, "peft adapters are attached"
    hooks = torch.nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return False, "global forward hooks are registered"
    if any(_has_hooks(m) for m in model.modules()):
        return False, "a module has forward hooks"
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        return False, "accelerate hooks (device map / offloading) wrap a module"
    if any(t.device.type != "cpu" for t in (*model.parameters(), *model.buffers())):
        return False, "the model is not (entirely) on CPU"
    if getattr(config, "hidden_act", None) != "relu2":
        return False, f"hidden_act is {getattr(config, 'hidden_act', None)!r} (the engine runs relu2)"
    base = model.model
    embed = base.embed_tokens
    if type(embed) is nn.Embedding:
        if embed.weight.dtype not in _MODEL_DTYPES:
            return False, f"embedding dtype {embed.weight.dtype}"
        dtype = embed.weight.dtype
    elif type(embed) is Int8Embedding:
        dtype = embed.dtype
    else:
        return False, f"unsupported embedding {type(embed).__name__}"
    if dtype not in _MODEL_DTYPES:
        return False, f"model dtype {dtype}"
    head = model.lm_head
    if type(head) is Int8Linear:
        pass
    elif type(head) in (FastLinear, nn.Linear):
        if head.bias is not None:
            return False, "lm_head has a bias"
        if head.weight.dtype not in (torch.bfloat16, torch.float32):
            return False, f"lm_head dtype {head.weight.dtype} (bf16, fp32 or int8 needed)"
    else:
        return False, f"unsupported lm_head {type(head).__name__}"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if config.num_attention_heads * head_dim != config.hidden_size or head_dim % 2:
        return False, "num_attention_heads * head_dim != hidden_size (or odd head_dim)"
    if config.hidden_size % 4 or config.intermediate_size % 4:
        return False, "hidden / intermediate size not a multiple of 4"
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in _ROPE_TYPES:
        return False, f"rope_type {rope.get('rope_type')!r} depends on more than the position"
    if model.training and getattr(config, "attention_dropout", 0.0):
        return False, "training mode with attention dropout"
    for layer in base.layers:
        for module in (layer.self_attn, layer.mlp):
            for name in _PROJECTIONS:
                proj = getattr(module, name, None)
                if proj is None:
                    continue
                if type(proj) is not PackedBitLinear:
                    return False, f"{name} is {type(proj).__name__}, not a plain PackedBitLinear"
                if proj.bias is not None or proj.rms_norm is not None:
                    return False, f"{name} has a bias or an input RMSNorm"
        norms = (layer.input_layernorm, layer.self_attn.attn_sub_norm, layer.post_attention_layernorm,
                 layer.mlp.ffn_sub_norm)
        if any(type(n) is not RMSNorm for n in norms):
            return False, "a norm is not bitnet_torch's RMSNorm"
        if type(layer.mlp.act_fn).__name__ != "ReLUSquaredActivation":
            return False, f"MLP activation {type(layer.mlp.act_fn).__name__}"
    if type(base.norm) is not RMSNorm:
        return False, "the final norm is not bitnet_torch's RMSNorm"
    if ops.extension_loaded():
        from .. import _backend

        return True, f"decode engine (compiled, cpu_isa={_backend.cpu_isa()})"
    return True, f"decode engine (pure-PyTorch reference: {ops.extension_error()})"


def decode_path(model: nn.Module) -> tuple[str, str]:
    """``("engine" | "eager", reason)``: the decode path ``generate()`` takes for this model by default."""
    if os.environ.get(ENGINE_ENV, "1") == "0":
        return "eager", f"{ENGINE_ENV}=0"
    ok, reason = engine_supported(model)
    return ("engine" if ok else "eager"), reason


class DecodeEngine:
    """Fused CPU decoding of up to ``max_batch_size`` sequences of up to ``max_seq_len`` tokens each.

    The KV cache (``[layers, max_batch_size, kv_heads, max_seq_len, head_dim]`` in the model dtype, keys and
    values) is allocated here, untouched until used; the model's weights are read in place, not copied. Slots
    are the sequences: :meth:`allocate` one, :meth:`prefill` its prompt (in chunks if you like), :meth:`decode`
    any set of slots one token each, :meth:`release` it. Not thread-safe: one caller at a time.
    """

    def __init__(self, model: nn.Module, max_batch_size: int, max_seq_len: int):
        ok, reason = engine_supported(model)
        if not ok:
            raise ValueError(f"DecodeEngine cannot run this model: {reason}")
        for name, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        config = model.config
        base = model.model
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.vocab_size = int(config.vocab_size)
        self.reason = reason
        self._model = model
        #: Prompts of at least this many tokens into an empty slot go through the model's forward (None: never).
        self.prefill_with_model_min: int | None = PREFILL_WITH_MODEL_MIN
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.eps = float(config.rms_norm_eps)
        self.attn_scale = float(self.head_dim**-0.5)
        embed = base.embed_tokens
        if isinstance(embed, Int8Embedding):
            self.dtype = embed.dtype
            self._embed, self._embed_scale = embed.weight, embed.weight_scale.float().contiguous()
        else:
            self.dtype = embed.weight.dtype
            self._embed, self._embed_scale = embed.weight.detach(), None
        if self._embed.shape[0] != self.vocab_size:
            raise ValueError(f"the embedding has {self._embed.shape[0]} rows but vocab_size is {self.vocab_size}")
        head = model.lm_head
        if isinstance(head, Int8Linear):
            self._head, self._head_scale = head.weight, head.weight_scale.float().contiguous()
        else:
            self._head, self._head_scale = head.weight.detach(), None
        gains = []
        packed, scales = [], []
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            gains += [layer.input_layernorm.weight, attn.attn_sub_norm.weight, layer.post_attention_layernorm.weight,
                      mlp.ffn_sub_norm.weight]
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                if not proj.weight.is_contiguous():
                    raise ValueError("a packed projection weight is not contiguous")
                packed.append(proj.weight)
                scales.append(proj.multiply_scale().detach().float().reshape(1))
        gains.append(base.norm.weight)
        # Norm gains in fp32 (exact for every model dtype; a few MB at most), one flat tensor.
        self._norms = torch.cat([g.detach().float().reshape(-1) for g in gains]).contiguous()
        self._packed = packed
        self._weight_scales = torch.cat(scales).contiguous() if scales else torch.zeros(0)
        # The rotary table, computed by the model's own rotary module (the cos/sin the eager model uses).
        with torch.no_grad():
            positions = torch.arange(max_seq_len).unsqueeze(0)
            cos, sin = base.rotary_emb(torch.empty(1, dtype=self.dtype), positions)
        self._cos = cos[0].float().contiguous()
        self._sin = sin[0].float().contiguous()
        shape = (len(base.layers), max_batch_size, self.num_kv_heads, max_seq_len, self.head_dim)
        self._k_cache = torch.empty(shape, dtype=self.dtype)
        self._v_cache = torch.empty(shape, dtype=self.dtype)
        self._lengths = [0] * max_batch_size
        self._allocated = [False] * max_batch_size
        # The conversions before this (packing, int8 head/embedding) leave freed temporaries in glibc's heap,
        # counted in the resident set while decoding: give them back.
        release_freed_memory()

    # -- slots ---------------------------------------------------------------------------------------------

    def allocate(self) -> int:
        """A free slot id (its cache empty); ``RuntimeError`` when all ``max_batch_size`` slots are in use."""
        for slot, used in enumerate(self._allocated):
            if not used:
                self._allocated[slot] = True
                self._lengths[slot] = 0
                return slot
        raise RuntimeError(f"all {self.max_batch_size} slots (max_batch_size) are in use; release one first")

    def release(self, slot: int) -> None:
        """Free ``slot``; its cache is forgotten."""
        self._check_slot(slot)
        self._allocated[slot] = False
        self._lengths[slot] = 0

    def length(self, slot: int) -> int:
        """Tokens held in the slot's KV cache."""
        self._check_slot(slot)
        return self._lengths[slot]

    def _check_slot(self, slot) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int):
            raise ValueError(f"a slot is an int, got {slot!r}")
        if not 0 <= slot < self.max_batch_size or not self._allocated[slot]:
            raise ValueError(f"slot {slot} is not allocated")

    # -- steps ---------------------------------------------------------------------------------------------

    def _token_list(self, token_ids, what: str) -> list[int]:
        if isinstance(token_ids, torch.Tensor):
            if token_ids.device.type != "cpu":
                raise ValueError(f"{what} must be on CPU, got device {token_ids.device}")
            if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
                raise TypeError(f"{what} must be integer token ids, got dtype {token_ids.dtype}")
            if token_ids.dim() > 1:
                raise ValueError(f"{what} must be 1-D, got shape {tuple(token_ids.shape)}")
            tokens = token_ids.reshape(-1).tolist()
        else:
            tokens = list(token_ids)
            if any(isinstance(t, bool) or not isinstance(t, int) for t in tokens):
                raise TypeError(f"{what} must be ints")
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"{what}: token id {bad[0]} is out of range [0, {self.vocab_size})")
        return tokens

    def _step(self, tokens: list[int], positions: list[int], slots: list[int], logit_rows: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return ops.decode_step(
                torch.tensor(tokens, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64),
                torch.tensor(slots, dtype=torch.int64), torch.tensor(logit_rows, dtype=torch.int64),
                self._embed, self._embed_scale, self._norms, self._packed, self._weight_scales, self._cos, self._sin,
                self._head, self._head_scale, self._k_cache, self._v_cache, self.num_heads, self.num_kv_heads,
                self.eps, self.attn_scale,
            )

    def prefill(self, slot: int, token_ids) -> torch.Tensor:
        """Append ``token_ids`` (a non-empty chunk; may be called repeatedly: chunked prefill) to the slot's
        sequence; returns the fp32 logits ``[vocab]`` after the last of them."""
        self._check_slot(slot)
        tokens = self._token_list(token_ids, "token_ids")
        if not tokens:
            raise ValueError("prefill needs at least one token")
        start = self._lengths[slot]
        if start + len(tokens) > self.max_seq_len:
            raise RuntimeError(
                f"slot {slot}: the cache holds {self.max_seq_len} positions (max_seq_len); {start} are used and "
                f"{len(tokens)} more do not fit"
            )
        if start == 0 and self.prefill_with_model_min is not None and len(tokens) >= self.prefill_with_model_min:
            return self._prefill_with_model(slot, tokens)
        logits = None
        for i in range(0, len(tokens), PREFILL_CHUNK):
            chunk = tokens[i:i + PREFILL_CHUNK]
            positions = list(range(start + i, start + i + len(chunk)))
            last = i + PREFILL_CHUNK >= len(tokens)
            logits = self._step(chunk, positions, [slot] * len(chunk), [len(chunk) - 1] if last else [])
            self._lengths[slot] = start + i + len(chunk)
        return logits[0]

    def _prefill_with_model(self, slot: int, tokens: list[int]) -> torch.Tensor:
        """Prefill an empty slot with the model's own forward (the eager path: its logits are exactly those of
        eager ``generate()``'s prefill) and hand its keys/values over to the engine's cache."""
        with torch.no_grad():
            out = self._model(torch.tensor([tokens], dtype=torch.int64), use_cache=True, logits_to_keep=1)
            n = len(tokens)
            for layer, cached in enumerate(out.cache.layers):
                self._k_cache[layer, slot, :, :n] = cached.keys[0]
                self._v_cache[layer, slot, :, :n] = cached.values[0]
        self._lengths[slot] = len(tokens)
        return out.logits[0, -1].float()

    def decode(self, slots: Sequence[int], token_ids: Sequence[int]) -> torch.Tensor:
        """Append one token to each slot (all in one engine step); returns fp32 logits ``[len(slots), vocab]``."""
        slots = list(slots.tolist() if isinstance(slots, torch.Tensor) else slots)
        tokens = self._token_list(token_ids, "token_ids")
        if len(slots) != len(tokens):
            raise ValueError(f"got {len(slots)} slots but {len(tokens)} token ids")
        if not slots:
            raise ValueError("decode needs at least one slot")
        if len(set(slots)) != len(slots):
            raise ValueError(f"duplicate slots in {slots}")
        for slot in slots:
            self._check_slot(slot)
            if self._lengths[slot] + 1 > self.max_seq_len:
                raise RuntimeError(
                    f"slot {slot}: the cache is full ({self.max_seq_len} positions, max_seq_len)"
                )
        positions = [self._lengths[s] for s in slots]
        logits = self._step(tokens, positions, slots, list(range(len(slots))))
        for s in slots:
            self._lengths[s] += 1
        return logits


# ------------------------------------------------------------------------------------------------ generate()


class EngineCache(Cache):
    """The ``cache`` that routes ``BitNetForCausalLM.forward`` through a :class:`DecodeEngine` inside Transformers'
    own ``generate()`` loop (so logits processors, stopping criteria, streamers and sampling work unchanged).

    Row ``b`` of the batch is engine slot ``b``. Each forward appends the row's new tokens whose attention-mask
    entry is 1 (padding is skipped, so a padded prompt gives the numbers of the same prompt alone; positions
    count a row's own tokens, as Transformers derives them from the mask), and returns the logits after each
    row's last real token. Not compileable, not croppable (generate() never needs either on CPU).
    """

    def __init__(self, engine: DecodeEngine):
        super().__init__(layers=[])
        self.engine = engine
        self.slots: list[int] = []

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max((self.engine.length(s) for s in self.slots), default=0)

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.engine.max_seq_len

    def forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, **kwargs):
        """The model's forward for this step: ``CausalLMOutputWithPast(logits [B, 1, V] fp32, cache=self)``."""
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if input_ids is None or kwargs.get("inputs_embeds") is not None:
            raise ValueError("the decode engine takes input_ids (not inputs_embeds)")
        if kwargs.get("labels") is not None:
            raise ValueError("the decode engine computes no loss (labels given)")
        batch, length = input_ids.shape
        while len(self.slots) < batch:
            self.slots.append(self.engine.allocate())
        if batch != len(self.slots):
            raise ValueError(f"this cache holds {len(self.slots)} sequences, got a batch of {batch}")
        if attention_mask is not None and attention_mask.dim() == 2:
            new_mask = attention_mask[:, -length:].bool().tolist()
        else:
            new_mask = [[True] * length for _ in range(batch)]
        rows = [[int(t) for t, keep in zip(input_ids[b].tolist(), new_mask[b]) if keep] for b in range(batch)]
        logits = torch.zeros(batch, self.engine.vocab_size)
        if length == 1 and all(len(r) == 1 for r in rows):
            logits = self.engine.decode(self.slots, [r[0] for r in rows])
        else:
            for b, tokens in enumerate(rows):
                if tokens:
                    logits[b] = self.engine.prefill(self.slots[b], tokens)
        return CausalLMOutputWithPast(logits=logits[:, None, :], cache=self)


def engine_generate_kwargs(model: nn.Module, inputs, args: tuple, kwargs: dict) -> dict | None:
    """The extra ``generate()`` keyword arguments (``{"cache": EngineCache}``) that route this request through the
    decode engine, or None when it must take the eager path: engine off or unsupported, a cache / compile config /
    cache implementation given, inputs_embeds, beam search or assisted decoding, attention or hidden-state
    outputs, an attention mask that is not 2-D 0/1 or leaves a prompt empty, or no bound on the length."""
    if args or decode_path(model)[0] != "engine":
        return None
    for key in ("cache", "past_key_values", "compile_config", "inputs_embeds", "assistant_model", "prompt_lookup_num_tokens",
                "custom_generate", "position_ids", "token_type_ids", "cache_position", "negative_prompt_ids"):
        if kwargs.get(key) is not None:
            return None
    generation_config = kwargs.get("generation_config") or model.generation_config

    def setting(name, default=None):
        return kwargs.get(name, getattr(generation_config, name, default))

    if (setting("num_beams", 1) or 1) != 1 or setting("cache_implementation") is not None:
        return None
    if setting("output_attentions") or setting("output_hidden_states") or setting("use_cache", True) is False:
        return None
    if setting("penalty_alpha") is not None or setting("dola_layers") is not None:
        return None
    if setting("assistant_early_exit") is not None or setting("prompt_lookup_num_tokens") is not None:
        return None
    input_ids = inputs if inputs is not None else kwargs.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        return None
    if input_ids.device.type != "cpu" or input_ids.shape[1] == 0:
        return None
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2 or mask.shape != input_ids.shape or not bool(((mask == 0) | (mask == 1)).all()):
            return None
        if bool((mask.sum(-1) == 0).any()):
            return None
    max_new = setting("max_new_tokens")
    if max_new is not None:
        needed = input_ids.shape[1] + int(max_new)
    else:
        max_length = setting("max_length")
        if max_length is None:
            return None
        needed = int(max_length)
    batch = input_ids.shape[0] * int(setting("num_return_sequences", 1) or 1)
    try:
        engine = DecodeEngine(model, max_batch_size=batch, max_seq_len=max(needed, input_ids.shape[1] + 1))
    except ValueError as exc:  # e.g. a config the engine's checks refuse: the eager path still works
        logger.info("decode engine not used: %s", exc)
        return None
    return {"cache": EngineCache(engine)}
