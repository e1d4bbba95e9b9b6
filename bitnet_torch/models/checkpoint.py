"""Loading and saving BitNet checkpoints through Transformers' own ``from_pretrained`` / ``save_pretrained``.

Forms we read (SPEC §3), from a local folder or a hub id:

* packed — ``<proj>.weight`` uint8 ``[N/4, K]`` + ``<proj>.weight_scale`` ``[1]``, ``quantization_config``
  ``{quant_method: bitnet, quantization_mode: offline, linear_class: autobitlinear | bitlinear}``
  → :class:`~bitnet_torch.nn.PackedBitLinear` buffers, read straight from the (memory-mapped) file: no float
  copy of a projection exists at any time;
* master — float ``<proj>.weight`` ``[N, K]``, ``quantization_mode: online`` → trainable
  :class:`~bitnet_torch.nn.BitLinear`, or with ``packed=True`` quantized and packed one tensor at a time while
  loading (:mod:`.pack_on_load`).

How Transformers' quantizer is kept out: ``from_pretrained`` would build an ``HfQuantizer`` for
``quant_method: bitnet`` from ``config.quantization_config`` and swap our layers for its own. We pass the
model a config whose ``quantization_config`` is ``None`` during the call (so no quantizer is built) and the
model constructor receives the real one as the private keyword ``_quantization_config``; the loaded model's
config carries it again afterwards. Nothing global is patched, so Transformers' own ``BitNetForCausalLM``
keeps working unchanged in the same process.

Before anything is read we check the files (safetensors only, headers complete, sizes right, tensor dtypes
and shapes as the config says) and raise :class:`BitNetCheckpointError` naming the problem.

Saving writes either form (``save_pretrained(path, packed=True|False)``); the ``quantization_config`` that
describes the written tensors is always in ``config.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import struct
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import cached_file

from .. import ops
from ..nn import BitLinear, Int8Embedding, Int8Linear, PackedBitLinear
from ..packing import packed_shape
from .configuration import BitNetConfig, MASTER_QUANTIZATION_CONFIG, PACKED_QUANTIZATION_CONFIG
from .pack_on_load import PackOnLoadConfig, register_pack_on_load

__all__ = [
    "BitNetCheckpointError",
    "checkpoint_state_dict",
    "inspect_checkpoint",
    "load_pretrained",
    "resolve_safetensors_files",
    "save_pretrained",
]

logger = logging.getLogger(__name__)

_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin", "tf_model.h5")
_SAFE_NAME = "model.safetensors"
_SAFE_INDEX = "model.safetensors.index.json"
_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


class BitNetCheckpointError(ValueError):
    """A checkpoint that is not a usable BitNet checkpoint (wrong model, corrupt file, wrong tensors)."""


# ---------------------------------------------------------------------------------------------------------
# Finding and checking the files
# ---------------------------------------------------------------------------------------------------------


def resolve_safetensors_files(path: str | os.PathLike, **hub_kwargs: Any) -> list[str]:
    """Return the local paths of the checkpoint's safetensors files (downloading from the hub if needed).

    Raises :class:`BitNetCheckpointError` when there are none, and says so when only pickle weights exist
    (we never unpickle: convert them to safetensors first).
    """
    path = str(path)
    subfolder = hub_kwargs.get("subfolder") or ""
    if os.path.isdir(path):
        folder = os.path.join(path, subfolder)
        index = os.path.join(folder, _SAFE_INDEX)
        single = os.path.join(folder, _SAFE_NAME)
        if os.path.isfile(index):
            return _files_from_index(index)
        if os.path.isfile(single):
            return [single]
        pickles = [name for name in _PICKLE_NAMES if os.path.isfile(os.path.join(folder, name))]
    else:
        kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
        index = cached_file(path, _SAFE_INDEX, _raise_exceptions_for_missing_entries=False, **kwargs)
        if index is not None:
            return _files_from_index(index, path, kwargs)
        single = cached_file(path, _SAFE_NAME, _raise_exceptions_for_missing_entries=False, **kwargs)
        if single is not None:
            return [single]
        pickles = [
            name for name in _PICKLE_NAMES[:2]
            if cached_file(path, name, _raise_exceptions_for_missing_entries=False, **kwargs) is not None
        ]
    if pickles:
        raise BitNetCheckpointError(
            f"{path} holds only pickle weights ({', '.join(pickles)}); bitnet_torch loads safetensors only "
            "(pickle files can run arbitrary code). Convert them with safetensors.torch.save_file first."
        )
    raise BitNetCheckpointError(f"{path} has no {_SAFE_NAME} or {_SAFE_INDEX}: no safetensors weights to load")


def _files_from_index(index_path: str, repo: str | None = None, hub_kwargs: dict | None = None) -> list[str]:
    try:
        with open(index_path, encoding="utf-8") as handle:
            weight_map = json.load(handle)["weight_map"]
    except (OSError, ValueError, KeyError) as exc:
        raise BitNetCheckpointError(f"{index_path} is not a valid safetensors index: {exc}") from exc
    names = sorted(set(weight_map.values()))
    if repo is None:
        return [os.path.join(os.path.dirname(index_path), name) for name in names]
    return [cached_file(repo, name, **(hub_kwargs or {})) for name in names]


def _read_header(file_path: str) -> dict[str, dict[str, Any]]:
    """Parse one safetensors header and check that the file holds every byte it announces."""
    size = os.path.getsize(file_path)
    try:
        with open(file_path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise BitNetCheckpointError(f"{file_path} is truncated: {size} bytes, not even a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise BitNetCheckpointError(
                    f"{file_path} is truncated or corrupt: its header claims {header_len} bytes, the file has {size}"
                )
            header = json.loads(handle.read(header_len))
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, BitNetCheckpointError):
            raise
        raise BitNetCheckpointError(f"{file_path} is not a safetensors file (unreadable header: {exc})") from exc
    header.pop("__metadata__", None)
    data_end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + header_len + data_end != size:
        raise BitNetCheckpointError(
            f"{file_path} is truncated or corrupt: the header describes {8 + header_len + data_end} bytes, "
            f"the file has {size}"
        )
    return header


def inspect_checkpoint(files: list[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Return ``{tensor name: (safetensors dtype, shape)}`` over all files, validating each header."""
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file_path in files:
        for name, info in _read_header(file_path).items():
            tensors[name] = (info["dtype"], tuple(info["shape"]))
    return tensors


def _projection_shapes(config: BitNetConfig, prefix: str = "model.") -> dict[str, tuple[int, int]]:
    """``{"<prefix>layers.i.<proj>": (out_features, in_features)}`` for every ternary projection."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    hidden, inter = config.hidden_size, config.intermediate_size
    per_layer = {
        "self_attn.q_proj": (q_out, hidden),
        "self_attn.k_proj": (kv_out, hidden),
        "self_attn.v_proj": (kv_out, hidden),
        "self_attn.o_proj": (hidden, q_out),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    return {
        f"{prefix}layers.{i}.{name}": shape for i in range(config.num_hidden_layers) for name, shape in per_layer.items()
    }


def check_checkpoint_tensors(tensors: dict[str, tuple[str, tuple[int, ...]]], config: BitNetConfig, where: str) -> None:
    """Check that the projections and embedding in ``tensors`` have the dtypes and shapes ``config`` implies.

    Raises :class:`BitNetCheckpointError` naming the first offending tensor.
    """
    packed = config.is_packed
    # A causal-LM checkpoint names tensors "model.layers...", a base-model (BitNetModel) one "layers...".
    prefix = "model." if "model.embed_tokens.weight" in tensors else ""
    embed = tensors.get(f"{prefix}embed_tokens.weight")
    if embed is None:
        raise BitNetCheckpointError(f"{where}: no model.embed_tokens.weight — not a BitNet/Llama-style checkpoint")
    if embed[1] != (config.vocab_size, config.hidden_size):
        raise BitNetCheckpointError(
            f"{where}: model.embed_tokens.weight has shape {embed[1]}, the config implies "
            f"{(config.vocab_size, config.hidden_size)}"
        )
    for module, (n, k) in _projection_shapes(config, prefix).items():
        weight = tensors.get(f"{module}.weight")
        if weight is None:
            raise BitNetCheckpointError(f"{where}: {module}.weight is missing")
        dtype, shape = weight
        if packed:
            expected = packed_shape(n, k)
            if dtype != "U8" or shape != expected:
                hint = " (float [N, K] weights: this is a master checkpoint whose config says offline)" if (
                    dtype in _FLOAT_DTYPES and shape == (n, k)) else ""
                raise BitNetCheckpointError(
                    f"{where}: {module}.weight is {dtype} {shape}, a packed checkpoint needs U8 {expected}{hint}"
                )
            scale = tensors.get(f"{module}.weight_scale")
            if scale is None:
                raise BitNetCheckpointError(f"{where}: {module}.weight_scale is missing (packed checkpoint)")
            if scale[1] not in ((1,), ()):
                raise BitNetCheckpointError(f"{where}: {module}.weight_scale has shape {scale[1]}, expected (1,)")
        elif dtype not in _FLOAT_DTYPES or shape != (n, k):
            hint = " (uint8 codes: this is a packed checkpoint whose config says online)" if dtype == "U8" else ""
            raise BitNetCheckpointError(
                f"{where}: {module}.weight is {dtype} {shape}, a master checkpoint needs a float {(n, k)}{hint}"
            )


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def _load_config(cls, path, kwargs: dict, hub_kwargs: dict) -> tuple[BitNetConfig, dict]:
    """Read the config like ``AutoModel.from_pretrained`` does; refuse one that is not ``model_type: bitnet``."""
    config = kwargs.pop("config", None)
    if isinstance(config, BitNetConfig):
        return copy.deepcopy(config), kwargs
    if isinstance(config, PretrainedConfig):
        if config.model_type != "bitnet":
            raise BitNetCheckpointError(f"config has model_type {config.model_type!r}, not 'bitnet'")
        return BitNetConfig.from_dict(config.to_dict()), kwargs
    config_path = config if config is not None else path
    try:
        raw, _ = PretrainedConfig.get_config_dict(config_path, **hub_kwargs)
    except OSError as exc:
        raise BitNetCheckpointError(f"cannot read a config.json from {config_path}: {exc}") from exc
    model_type = raw.get("model_type")
    if model_type != "bitnet":
        raise BitNetCheckpointError(
            f"{config_path} is not a BitNet checkpoint: its config has model_type {model_type!r}, expected 'bitnet'. "
            "To turn a Llama-family model into BitNet use bitnet_torch.models.convert_llama_to_bitnet."
        )
    kwargs_orig = dict(kwargs)
    for name in ("dtype", "torch_dtype"):
        if kwargs.get(name) == "auto":
            kwargs.pop(name)
    try:
        config, kwargs = cls.config_class.from_pretrained(config_path, return_unused_kwargs=True, **hub_kwargs, **kwargs)
    except (TypeError, ValueError) as exc:
        raise BitNetCheckpointError(f"{config_path}: invalid BitNet config: {exc}") from exc
    for name in ("dtype", "torch_dtype"):
        if kwargs_orig.get(name) is not None:
            kwargs[name] = kwargs_orig[name]
    return config, kwargs


def load_pretrained(cls, pretrained_model_name_or_path, *model_args, packed: bool | None = None, **kwargs):
    """Implementation of :meth:`BitNetForCausalLM.from_pretrained` (see its docstring)."""
    if kwargs.get("use_safetensors") is False:
        raise ValueError("bitnet_torch loads safetensors checkpoints only (use_safetensors=False is refused)")
    if kwargs.pop("quantization_config", None) is not None:
        raise ValueError(
            "BitNetForCausalLM.from_pretrained takes no quantization_config: the checkpoint's own config says how it "
            "is stored; pass packed=True to pack float master weights while loading"
        )
    if kwargs.get("gguf_file"):
        raise ValueError("BitNetForCausalLM does not load GGUF files; load the safetensors checkpoint")
    if kwargs.get("state_dict") is not None:
        raise ValueError("BitNetForCausalLM.from_pretrained loads from files; build the model and load_state_dict instead")
    kwargs["use_safetensors"] = True
    hub_kwargs = {name: kwargs[name] for name in _HUB_KWARGS if kwargs.get(name) is not None}
    config, kwargs = _load_config(cls, pretrained_model_name_or_path, kwargs, hub_kwargs)

    where = str(pretrained_model_name_or_path)
    files = resolve_safetensors_files(pretrained_model_name_or_path, **hub_kwargs)
    check_checkpoint_tensors(inspect_checkpoint(files), config, where)

    stored_packed = config.is_packed
    if packed is None:
        packed = stored_packed
    if stored_packed and not packed:
        raise BitNetCheckpointError(
            f"{where} is a packed (offline) checkpoint: its float master weights are gone, so it cannot be loaded "
            "as a trainable model (packed=False). Load the master (online, e.g. '-bf16') checkpoint to train."
        )
    pack_while_loading = packed and not stored_packed
    target_form = dict(PACKED_QUANTIZATION_CONFIG) if pack_while_loading else dict(config.quantization_config)

    user_wants_info = kwargs.pop("output_loading_info", False)
    load_config = copy.deepcopy(config)
    load_config.quantization_config = None  # no Transformers quantizer (see the module docstring)
    extra: dict[str, Any] = {}
    if pack_while_loading:
        register_pack_on_load()
        extra["quantization_config"] = PackOnLoadConfig()
    try:
        model, info = PreTrainedModel.from_pretrained.__func__(
            cls,
            pretrained_model_name_or_path,
            *model_args,
            config=load_config,
            output_loading_info=True,
            _quantization_config=target_form,
            **extra,
            **kwargs,
        )
    except SafetensorError as exc:
        raise BitNetCheckpointError(f"{where}: corrupt safetensors data: {exc}") from exc

    if pack_while_loading:
        for name in ("hf_quantizer", "is_quantized", "quantization_method"):
            model.__dict__.pop(name, None)
        model.config._is_quantized = False
    model.config.quantization_config = target_form
    _raise_on_bad_loading_info(info, where)
    model._apply_int8_options()
    return (model, info) if user_wants_info else model


def _raise_on_bad_loading_info(info: dict, where: str) -> None:
    """Refuse a load that left weights uninitialised or skipped mismatched ones."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        details = "; ".join(f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in list(mismatched)[:5])
        raise BitNetCheckpointError(f"{where}: tensor shapes do not match the config: {details}")
    if missing:
        raise BitNetCheckpointError(f"{where}: the checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        logger.warning("%s: ignored %d tensors the model does not use, e.g. %s", where, len(unexpected), unexpected[:5])


# ---------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------


def checkpoint_state_dict(model, packed: bool, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` in checkpoint form: packed (SPEC §3, multiply convention) or float master.

    ``model`` is a :class:`BitNetForCausalLM` or a :class:`BitNetModel`. ``state_dict`` (same keys as
    ``model.state_dict()``, e.g. from a Trainer) replaces the model's own tensors. int8 runtime forms of the
    head / embedding are written back as float (checkpoints always hold float ones). Raises ``ValueError``
    when asked for master weights of a packed model (they no longer exist).
    """
    source = dict(state_dict) if state_dict is not None else model.state_dict()
    base = model._base_model()
    prefix = "" if base is model else "model."
    model_dtype = base.norm.weight.dtype
    out: dict[str, torch.Tensor] = {}
    handled: set[str] = set()
    for name, module in base.projections():
        key = f"{prefix}{name}"
        handled.update({f"{key}.weight", f"{key}.weight_scale"})
        if isinstance(module, PackedBitLinear):
            if not packed:
                raise ValueError(
                    "this model holds packed ternary codes; its float master weights do not exist, so it can only be "
                    "saved packed (save_pretrained(path, packed=True))"
                )
            scale = source[f"{key}.weight_scale"]
            if module.scale_convention == "divide":
                scale = scale.float().reciprocal().to(scale.dtype)
            out[f"{key}.weight"] = source[f"{key}.weight"]
            out[f"{key}.weight_scale"] = scale
        elif isinstance(module, BitLinear):
            weight = source[f"{key}.weight"]
            if packed:
                codes, scale = ops.quantize_pack_weight(weight.detach())
                out[f"{key}.weight"] = codes
                out[f"{key}.weight_scale"] = scale.reshape(1).to(weight.dtype)
            else:
                out[f"{key}.weight"] = weight
        else:
            raise TypeError(f"{key} is a {type(module).__name__}, expected BitLinear or PackedBitLinear")
    int8_scales = {"lm_head.weight_scale", f"{prefix}embed_tokens.weight_scale"}
    for key, value in source.items():
        if key not in handled and key not in int8_scales:
            out[key] = value
    if isinstance(base.embed_tokens, Int8Embedding):
        out[f"{prefix}embed_tokens.weight"] = base.embed_tokens.dequantized_weight(model_dtype)
    if isinstance(getattr(model, "lm_head", None), Int8Linear):
        if model.config.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        else:
            out["lm_head.weight"] = model.lm_head.dequantized_weight(model_dtype)
    return {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def save_pretrained(model, save_directory, packed: bool | None = None, **kwargs) -> None:
    """Implementation of :meth:`BitNetForCausalLM.save_pretrained` (see its docstring)."""
    if kwargs.get("safe_serialization") is False:
        raise ValueError("bitnet_torch saves safetensors only (safe_serialization=False is refused)")
    kwargs.pop("safe_serialization", None)
    if packed is None:
        packed = model.is_packed
    if any(isinstance(m, BitLinear) and m.lambda_ < 1.0 for m in model.modules()):
        logger.warning("saving a model in the lambda warm-up (lambda < 1): the checkpoint's forward is fully quantized")
    state_dict = checkpoint_state_dict(model, packed, kwargs.pop("state_dict", None))
    saved_form = dict(PACKED_QUANTIZATION_CONFIG if packed else MASTER_QUANTIZATION_CONFIG)
    current_form = model.config.quantization_config
    model.config.quantization_config = saved_form
    try:
        PreTrainedModel.save_pretrained(model, save_directory, state_dict=state_dict, **kwargs)
    finally:
        model.config.quantization_config = current_form
