"""The decoder the scheduler drives: slots with their own KV cache, chunked prefill, one batched decode step.

The scheduler codes against one interface (:class:`Decoder`), the one of the fused C++ decode engine
(``bitnet_torch.models.engine.DecodeEngine``)::

    allocate() -> slot            release(slot)            length(slot) -> tokens in its KV cache
    prefill(slot, token_ids) -> fp32 logits [vocab] after the chunk's last token (callable repeatedly)
    decode(slots, token_ids) -> fp32 logits [len(slots), vocab], one new token per slot

and relies on one promise: a slot's logits are bitwise the same whether it is decoded alone or in any batch.
:func:`make_decoder` uses the engine when it is importable and supports the model, else :class:`ModelDecoder`,
built on the model's own modules: each slot has its own ``DynamicCache``; prefill is the model's ``forward`` on
that slot alone (so a one-chunk prompt gives exactly ``generate()``'s logits); a decode step runs the layers once
for the whole batch -- embedding, RMSNorms, the packed projections (one weight stream for every sequence) and
the int8 head on ``[batch, 1, hidden]`` -- and only RoPE, the cache update and attention per sequence, with the
same calls the model's attention makes. Every batched op works row by row (per-token int8 activations, exact
integer accumulation, per-row norms), so each row is bitwise what a forward of that sequence alone gives.

Why not one batched ``forward`` with a static cache: Transformers' caches write one position for the whole batch
(``cache_position`` is shared), so sequences of different lengths would need padding, and padding changes the
attention's float arithmetic with what else is in the batch. Models whose projections or head are not
row-independent (float ``BitLinear`` master weights, a float head) decode one ``forward`` per sequence instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol, Sequence

import torch

__all__ = ["Decoder", "ModelDecoder", "make_decoder", "load_model", "batched_decode_supported", "eos_token_ids"]

logger = logging.getLogger(__name__)


class Decoder(Protocol):
    """What the scheduler needs from a decoder (the decode engine's interface)."""

    max_batch_size: int
    max_seq_len: int
    vocab_size: int

    def allocate(self) -> int: ...
    def release(self, slot: int) -> None: ...
    def length(self, slot: int) -> int: ...
    def prefill(self, slot: int, token_ids) -> torch.Tensor: ...
    def decode(self, slots: Sequence[int], token_ids: Sequence[int]) -> torch.Tensor: ...


class ModelDecoder:
    """:class:`Decoder` over ``model.forward``: one ``DynamicCache`` per slot, one forward per sequence and step.

    Every call runs under ``torch.inference_mode``. A slot's results depend only on its own tokens, so they are
    identical alone or in any batch, and identical to ``model.generate`` on the same prompt when the prompt is
    prefilled in one chunk.
    """

    def __init__(self, model: torch.nn.Module, max_batch_size: int, max_seq_len: int, batched: bool | None = None):
        if max_batch_size < 1 or max_seq_len < 2:
            raise ValueError(f"max_batch_size ({max_batch_size}) must be >= 1 and max_seq_len ({max_seq_len}) >= 2")
        self.model = model.eval()
        self.max_batch_size = int(max_batch_size)
        self.max_seq_len = int(max_seq_len)
        self.vocab_size = int(model.config.vocab_size)
        self._caches: dict[int, object] = {}
        self._lengths: dict[int, int] = {}
        self._free = list(range(self.max_batch_size - 1, -1, -1))
        self._device = next(model.parameters(), torch.empty(0)).device
        supported, why = batched_decode_supported(model)
        if batched and not supported:
            raise ValueError(f"batched decode is not bitwise batch-invariant for this model: {why}")
        self.batched = supported if batched is None else bool(batched)
        if not self.batched:
            logger.info("decoding one forward per sequence (%s)", why if not supported else "asked")

    def allocate(self) -> int:
        """A free slot with an empty KV cache; ``RuntimeError`` when all ``max_batch_size`` slots are taken."""
        from transformers import DynamicCache

        if not self._free:
            raise RuntimeError(f"all {self.max_batch_size} decoder slots are in use")
        slot = self._free.pop()
        self._caches[slot] = DynamicCache(config=self.model.config)
        self._lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        """Free ``slot`` and its KV cache (a slot not in use is refused with ``KeyError``)."""
        self._check(slot)
        del self._caches[slot], self._lengths[slot]
        self._free.append(slot)

    def length(self, slot: int) -> int:
        """Tokens in ``slot``'s KV cache."""
        self._check(slot)
        return self._lengths[slot]

    def _check(self, slot: int) -> None:
        if slot not in self._caches:
            raise KeyError(f"slot {slot} is not allocated")

    def _forward(self, slot: int, ids: torch.Tensor) -> torch.Tensor:
        if self._lengths[slot] + ids.numel() > self.max_seq_len:
            raise ValueError(f"slot {slot} would hold {self._lengths[slot] + ids.numel()} tokens, more than "
                             f"max_seq_len={self.max_seq_len}")
        with torch.inference_mode():
            out = self.model(input_ids=ids.view(1, -1).to(self._device), cache=self._caches[slot], use_cache=True,
                             logits_to_keep=1)
        self._lengths[slot] += ids.numel()
        return out.logits[0, -1].float()

    def prefill(self, slot: int, token_ids) -> torch.Tensor:
        """Append ``token_ids`` (a chunk; call again for the next one) to ``slot``; fp32 logits after the last."""
        self._check(slot)
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("prefill needs at least one token")
        return self._forward(slot, ids)

    def decode(self, slots: Sequence[int], token_ids: Sequence[int]) -> torch.Tensor:
        """Append one token to each slot; fp32 logits ``[len(slots), vocab]`` (row i for ``slots[i]``)."""
        if len(slots) != len(token_ids) or not slots:
            raise ValueError(f"decode needs one token per slot, got {len(slots)} slots and {len(token_ids)} tokens")
        if len(set(slots)) != len(slots):
            raise ValueError(f"decode got a slot twice: {list(slots)}")
        for slot in slots:
            self._check(slot)
            if self._lengths[slot] + 1 > self.max_seq_len:
                raise ValueError(f"slot {slot} is full (max_seq_len={self.max_seq_len})")
        if self.batched:
            return self._decode_batched(list(slots), [int(t) for t in token_ids])
        rows = [self._forward(slot, torch.tensor([int(tok)])) for slot, tok in zip(slots, token_ids)]
        return torch.stack(rows)

    def _decode_batched(self, slots: list[int], token_ids: list[int]) -> torch.Tensor:
        """One token for every slot: the layers once over ``[batch, 1, hidden]``, attention per sequence.

        Follows ``BitNetModel.forward`` / ``BitNetDecoderLayer.forward`` / ``BitNetAttention.forward`` step for
        step; per sequence it builds the mask and RoPE as the model does for a batch of one.
        """
        from transformers.masking_utils import create_causal_mask

        from ..models.attention import apply_rotary, attend
        from ..models.modeling import project_group

        base = self.model.model
        with torch.inference_mode():
            hidden = base.embed_tokens(torch.tensor(token_ids, dtype=torch.long, device=self._device).view(-1, 1))
            rows = []
            for i, slot in enumerate(slots):
                cache = self._caches[slot]
                position_ids = torch.tensor([[self._lengths[slot]]], device=self._device)
                row = hidden[i:i + 1]
                mask = create_causal_mask(config=base.config, inputs_embeds=row, attention_mask=None, cache=cache,
                                          position_ids=position_ids)
                rows.append((cache, position_ids, mask, base.rotary_emb(row, position_ids=position_ids)))
            for layer in base.layers[: base.config.num_hidden_layers]:
                attn = layer.self_attn
                residual = hidden
                normed = layer.input_layernorm(hidden)
                query, key, value = project_group(normed, (attn.q_proj, attn.k_proj, attn.v_proj))
                outputs = []
                for i, (cache, position_ids, mask, (cos, sin)) in enumerate(rows):
                    shape = (1, 1, -1, attn.head_dim)
                    q = query[i:i + 1].view(shape).transpose(1, 2)
                    k = key[i:i + 1].view(shape).transpose(1, 2)
                    v = value[i:i + 1].view(shape).transpose(1, 2)
                    q, k = apply_rotary(q, k, cos, sin)
                    kwargs = {"position_ids": position_ids, "use_cache": True}
                    k, v = cache.update(k, v, attn.layer_idx, kwargs=kwargs)
                    out, _ = attend(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling, **kwargs)
                    outputs.append(out.reshape(1, 1, -1).contiguous())
                attended = attn.o_proj(attn.attn_sub_norm(torch.cat(outputs, dim=0)))
                hidden = residual + attended
                residual = hidden
                hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
            logits = self.model.lm_head(base.norm(hidden))
        for slot in slots:
            self._lengths[slot] += 1
        return logits[:, -1].float()


def batched_decode_supported(model: torch.nn.Module) -> tuple[bool, str]:
    """Whether :class:`ModelDecoder` can decode a batch in one pass with bitwise per-row results: a BitNet model
    with packed projections and an int8 head (every batched op then works row by row), sdpa or eager attention."""
    from ..nn import Int8Linear, PackedBitLinear

    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "projections") or not hasattr(base, "rotary_emb"):
        return False, f"{type(model).__name__} is not a bitnet_torch BitNetForCausalLM"
    if not all(isinstance(m, PackedBitLinear) for _, m in base.projections()):
        return False, "the projections are not packed (PackedBitLinear)"
    if not isinstance(getattr(model, "lm_head", None), Int8Linear):
        return False, "the output head is not int8 (a float head's matmul may depend on the batch)"
    if model.config._attn_implementation not in ("sdpa", "eager"):
        return False, f"attention implementation {model.config._attn_implementation!r}"
    return True, ""


def make_decoder(model: torch.nn.Module, max_batch_size: int, max_seq_len: int) -> Decoder:
    """The fused decode engine when it is importable and supports ``model``, else :class:`ModelDecoder` (logged)."""
    try:
        from ..models.engine import DecodeEngine, engine_supported
    except ImportError as exc:
        logger.info("decode engine not available (%s); serving with the model's forward", exc)
    else:
        supported, why = engine_supported(model)
        if supported:
            logger.info("serving with the fused decode engine (batch %d, %d positions)", max_batch_size, max_seq_len)
            return DecodeEngine(model, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
        logger.info("decode engine does not support this model (%s); serving with the model's forward", why)
    return ModelDecoder(model, max_batch_size, max_seq_len)


def eos_token_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """Tokens that end a generation: the model's ``generation_config.eos_token_id``, the tokenizer's EOS and,
    when the vocabulary has it, ``<|eot_id|>`` (the end of a chat turn)."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    if isinstance(eot, int) and eot != tokenizer.unk_token_id:
        ids.add(eot)
    return sorted(ids)


def _model_from_gguf(path: Path):
    """A model imported from a GGUF file (the one place that knows where the GGUF reader lives)."""
    from ..export import model_from_gguf

    return model_from_gguf(path, quantize_lm_head=True, quantize_embedding=True)


def load_model(model_path: str | Path, tokenizer_path: str | Path | None = None):
    """``(model, tokenizer)`` to serve: a packed or master checkpoint directory (packed on load, int8 head and
    embedding), or a ``.gguf`` file with ``tokenizer_path`` a directory holding its tokenizer.

    The tokenizer (and its chat template) come from the model's files only. Refuses missing paths, a file that is
    not a .gguf, and a .gguf without a tokenizer directory (``ValueError`` / ``FileNotFoundError``).
    """
    from transformers import AutoTokenizer

    path = Path(model_path)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; pass a checkpoint directory or a GGUF file")
        if tokenizer_path is None:
            raise ValueError("a .gguf model needs a tokenizer directory (--tokenizer DIR with tokenizer.json)")
        model = _model_from_gguf(path)
    else:
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"config.json of the model not found in {path}")
        from ..models import BitNetForCausalLM

        model = BitNetForCausalLM.from_pretrained(path, packed=True, quantize_lm_head=True, quantize_embedding=True)
    tok_path = Path(tokenizer_path) if tokenizer_path is not None else path
    if not tok_path.exists():
        raise FileNotFoundError(f"tokenizer not found: {tok_path}")
    tokenizer = AutoTokenizer.from_pretrained(tok_path)
    return model.eval(), tokenizer
