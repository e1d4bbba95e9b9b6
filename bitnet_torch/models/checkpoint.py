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

Before any model is built we check the files (safetensors only, every header entry well formed and the file
holding every byte it announces, shard names confined to the checkpoint folder) and the config against them
(sizes possible, every declared layer present, every stored tensor's dtype and shape as the config says) and
raise :class:`BitNetCheckpointError` naming the problem; after loading, packed codes and scales are checked in
one pass (:func:`check_packed_values`). Tensors that are merely absent are initialised and reported in
``missing_keys``, as Transformers does.

Saving writes either form (``save_pretrained(path, packed=True|False)``); the ``quantization_config`` that
describes the written tensors is always in ``config.json``. Saves are all or nothing
(:func:`bitnet_torch._atomic.atomic_directory`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import struct
from collections.abc import Callable
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import cached_file

from .. import ops
from .._atomic import atomic_directory
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
    "stale_weight_files",
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


def _safe_shard_name(index_path: str, name: Any) -> str:
    """Return ``name`` if it is a plain relative file name inside the index's folder; refuse anything else."""
    if not isinstance(name, str) or not name:
        raise BitNetCheckpointError(f"{index_path}: a weight_map entry is {name!r}, not a shard file name")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or ":" in name or "\0" in name:
        raise BitNetCheckpointError(
            f"{index_path}: the weight_map names the shard {name!r}, which lies outside the checkpoint directory; "
            "refused (an index may only name files beside it)"
        )
    return name


def _files_from_index(index_path: str, repo: str | None = None, hub_kwargs: dict | None = None) -> list[str]:
    try:
        with open(index_path, encoding="utf-8") as handle:
            index = json.load(handle)
    except (OSError, ValueError) as exc:
        raise BitNetCheckpointError(f"{index_path} is not a valid safetensors index: {exc}") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise BitNetCheckpointError(f"{index_path} is not a valid safetensors index: no weight_map object")
    names = sorted({_safe_shard_name(index_path, name) for name in weight_map.values()})
    if repo is None:
        folder = os.path.dirname(index_path)
        files = [os.path.join(folder, name) for name in names]
        for file_path in files:
            if not os.path.isfile(file_path):
                raise BitNetCheckpointError(
                    f"{index_path} names the shard {os.path.basename(file_path)}, which does not exist"
                )
        return files
    return [cached_file(repo, name, **(hub_kwargs or {})) for name in names]


#: Bytes per element of each safetensors dtype (the format's own list).
_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


def _check_header_entry(file_path: str, name: str, info: Any) -> int:
    """Validate one tensor entry of a safetensors header; return the end of its data."""
    if not isinstance(info, dict):
        raise BitNetCheckpointError(f"{file_path} has a corrupt header: the entry of {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _DTYPE_SIZES:
        raise BitNetCheckpointError(f"{file_path} has a corrupt header: {name!r} has dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BitNetCheckpointError(f"{file_path} has a corrupt header: {name!r} has shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise BitNetCheckpointError(
            f"{file_path} has a corrupt header: {name!r} has data_offsets {offsets!r} (need [begin, end])"
        )
    numel = 1
    for dim in shape:
        numel *= dim
    if offsets[1] - offsets[0] != numel * _DTYPE_SIZES[dtype]:
        raise BitNetCheckpointError(
            f"{file_path} has a corrupt header: {name!r} is {dtype} {tuple(shape)} ({numel * _DTYPE_SIZES[dtype]} "
            f"bytes) but its data_offsets span {offsets[1] - offsets[0]} bytes"
        )
    return offsets[1]


def _read_header(file_path: str) -> dict[str, dict[str, Any]]:
    """Parse one safetensors header, check every entry and that the file holds every byte it announces."""
    try:
        size = os.path.getsize(file_path)
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
    except BitNetCheckpointError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise BitNetCheckpointError(f"{file_path} is not a safetensors file (unreadable header: {exc})") from exc
    if not isinstance(header, dict):
        raise BitNetCheckpointError(
            f"{file_path} is not a safetensors file: its header is a JSON {type(header).__name__}, not an object"
        )
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise BitNetCheckpointError(f"{file_path} has a corrupt header: __metadata__ is not an object")
    data_end = max((_check_header_entry(file_path, name, info) for name, info in header.items()), default=0)
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
            if name in tensors:
                raise BitNetCheckpointError(f"{file_path}: tensor {name} is stored in more than one shard")
            tensors[name] = (info["dtype"], tuple(info["shape"]))
    return tensors


_TORCH_TO_SAFETENSORS = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.int64: "I64", torch.float64: "F64",
}


def inspect_state_dict(state_dict: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (safetensors dtype, shape)}`` of an in-memory state dict (what :func:`inspect_checkpoint` gives)."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise BitNetCheckpointError(f"state_dict[{name!r}] is a {type(value).__name__}, not a tensor")
        out[name] = (_TORCH_TO_SAFETENSORS.get(value.dtype, str(value.dtype)), tuple(value.shape))
    return out


_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")
_SUBLAYER_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.attn_sub_norm.weight")


def _projection_shapes(config: BitNetConfig) -> dict[str, tuple[int, int]]:
    """``{"<proj>": (out_features, in_features)}`` for the seven ternary projections of one layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    hidden, inter = config.hidden_size, config.intermediate_size
    return {
        "self_attn.q_proj": (q_out, hidden),
        "self_attn.k_proj": (kv_out, hidden),
        "self_attn.v_proj": (kv_out, hidden),
        "self_attn.o_proj": (hidden, q_out),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }


def check_checkpoint_tensors(tensors: dict[str, tuple[str, tuple[int, ...]]], config: BitNetConfig, where: str) -> None:
    """Check the tensors a checkpoint holds against what ``config`` implies, before any model is built.

    ``tensors`` is ``{name: (safetensors dtype, shape)}`` (:func:`inspect_checkpoint`). Tensors the config does
    not describe are left to Transformers (reported as unexpected); tensors that are absent are initialised
    and reported as missing, as in Transformers. Refused with :class:`BitNetCheckpointError` naming the problem:

    * a config that cannot describe a model (:meth:`BitNetConfig.check_sizes`);
    * a checkpoint none of whose tensors belong to a BitNet model, or with no tensor at all for a layer the
      config declares (``num_hidden_layers`` larger than the layers stored: checked before anything of that
      size is iterated, so an absurd count is refused at once), or with no tensor that confirms
      ``vocab_size`` / ``hidden_size`` / ``intermediate_size``;
    * a known tensor whose dtype or shape disagrees with the config (packed U8 ``[N/4, K]`` + ``weight_scale``
      ``[1]`` or float ``[N, K]``, as ``quantization_config`` says), and half a packed pair (codes without
      their ``weight_scale`` or the reverse).
    """
    try:
        config.check_sizes()
    except ValueError as exc:
        raise BitNetCheckpointError(f"{where}: invalid BitNet config: {exc}") from exc
    # A causal-LM checkpoint names tensors "model.layers...", a base-model (BitNetModel) one "layers...".
    prefix = "model." if any(name.startswith("model.") for name in tensors) else ""
    layers: dict[int, dict[str, tuple[str, tuple[int, ...]]]] = {}
    for name, entry in tensors.items():
        if name.startswith(prefix):
            match = _LAYER_KEY.fullmatch(name[len(prefix):])
            if match:
                layers.setdefault(int(match.group(1)), {})[match.group(2)] = entry
    hidden, vocab, inter = config.hidden_size, config.vocab_size, config.intermediate_size
    expected: dict[str, tuple[int, ...]] = {
        f"{prefix}embed_tokens.weight": (vocab, hidden),
        f"{prefix}norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    confirmed: set[str] = set()
    known = 0
    for name, shape in expected.items():
        entry = tensors.get(name)
        if entry is None:
            continue
        known += 1
        if entry[0] not in _FLOAT_DTYPES or entry[1] != shape:
            raise BitNetCheckpointError(
                f"{where}: {name} is {entry[0]} {entry[1]}, the config implies a float {shape}"
            )
        confirmed.update(("hidden_size",) + (("vocab_size",) if len(shape) == 2 else ()))
    if not known and not layers:
        raise BitNetCheckpointError(
            f"{where}: none of the checkpoint's {len(tensors)} tensors (e.g. {sorted(tensors)[:3]}) belongs to a "
            "BitNet model (model.embed_tokens.weight, model.layers.<i>..., lm_head.weight): "
            "not a BitNet/Llama-style checkpoint"
        )
    present = [i for i in layers if i < config.num_hidden_layers]
    if len(present) < config.num_hidden_layers:  # before iterating over num_hidden_layers (it may be absurd)
        stored = f"layers {min(layers)}..{max(layers)}" if layers else "no decoder layer"
        raise BitNetCheckpointError(
            f"{where}: the config declares num_hidden_layers={config.num_hidden_layers} but the checkpoint holds "
            f"tensors for {len(present)} of them ({stored}): the config does not describe these weights"
        )
    projections = _projection_shapes(config)
    for i in range(config.num_hidden_layers):
        stored = layers[i]
        module = f"{prefix}layers.{i}"
        for proj, (n, k) in projections.items():
            _check_projection(stored, f"{module}.{proj}", proj, n, k, config, where)
            if f"{proj}.weight" in stored:
                confirmed.add("hidden_size")
                if proj.startswith("mlp."):
                    confirmed.add("intermediate_size")
        for norm in _SUBLAYER_NORMS + ("mlp.ffn_sub_norm.weight",):
            entry = stored.get(norm)
            if entry is None:
                continue
            shape = (inter,) if norm.startswith("mlp.") else (hidden,)
            if entry[0] not in _FLOAT_DTYPES or entry[1] != shape:
                raise BitNetCheckpointError(
                    f"{where}: {module}.{norm} is {entry[0]} {entry[1]}, the config implies a float {shape}"
                )
            confirmed.add("intermediate_size" if norm.startswith("mlp.") else "hidden_size")
    for size in ("vocab_size", "hidden_size", "intermediate_size"):
        if size not in confirmed:
            raise BitNetCheckpointError(
                f"{where}: no tensor in the checkpoint confirms config.{size}={getattr(config, size)} "
                "(the tensors that would carry it are all missing): refusing to build a model of unverified size"
            )


def _check_projection(stored: dict, module: str, proj: str, n: int, k: int, config: BitNetConfig, where: str) -> None:
    """Check the tensors of one projection that are present (see :func:`check_checkpoint_tensors`)."""
    weight, scale, bias = stored.get(f"{proj}.weight"), stored.get(f"{proj}.weight_scale"), stored.get(f"{proj}.bias")
    if bias is not None and (bias[0] not in _FLOAT_DTYPES or bias[1] != (n,)):
        raise BitNetCheckpointError(f"{where}: {module}.bias is {bias[0]} {bias[1]}, the config implies a float {(n,)}")
    if config.is_packed:
        try:
            expected = packed_shape(n, k)
        except ValueError as exc:
            raise BitNetCheckpointError(f"{where}: {module}: the config's sizes cannot be packed: {exc}") from exc
        if weight is not None and (weight[0] != "U8" or weight[1] != expected):
            dtype, shape = weight
            hint = " (float [N, K] weights: this is a master checkpoint whose config says offline)" if (
                dtype in _FLOAT_DTYPES and shape == (n, k)) else ""
            raise BitNetCheckpointError(
                f"{where}: {module}.weight is {dtype} {shape}, a packed checkpoint needs U8 {expected}{hint}"
            )
        if (weight is None) != (scale is None):
            have, lack = ("weight", "weight_scale") if scale is None else ("weight_scale", "weight")
            raise BitNetCheckpointError(
                f"{where}: {module}.{lack} is missing but {module}.{have} is present: a packed projection needs "
                "both its codes and their scale (packed checkpoint)"
            )
        if weight is None:
            return
        if scale[1] not in ((1,), ()) or scale[0] not in _FLOAT_DTYPES:
            raise BitNetCheckpointError(
                f"{where}: {module}.weight_scale is {scale[0]} {scale[1]}, expected a float (1,)"
            )
        return
    if weight is None:
        return
    dtype, shape = weight
    if dtype not in _FLOAT_DTYPES or shape != (n, k):
        hint = " (uint8 codes: this is a packed checkpoint whose config says online)" if dtype == "U8" else ""
        raise BitNetCheckpointError(
            f"{where}: {module}.weight is {dtype} {shape}, a master checkpoint needs a float {(n, k)}{hint}"
        )


#: Elements per step of :func:`_packed_bytes_hold_code_3`: 256 KiB of words, so the temporary stays in cache.
_CODE_CHECK_CHUNK = 32768


def _packed_bytes_hold_code_3(packed: torch.Tensor) -> bool:
    """True when any 2-bit field of the uint8 tensor is 3 (the code SPEC §3 never writes), in one pass.

    ``(b & (b >> 1)) & 0b01010101`` has a bit set exactly where a field is ``0b11``; the bytes are viewed as
    int64 words when the layout allows (8 bytes per operation: shifts cross byte borders only into the odd
    bits, which the mask drops), and processed in cache-sized chunks so the data is read from memory once.
    """
    flat = packed.reshape(-1)
    words, mask = flat, 0x55
    if flat.numel() % 8 == 0 and flat.storage_offset() % 8 == 0:
        try:
            words, mask = flat.view(torch.int64), 0x5555555555555555
        except RuntimeError:
            pass
    step = _CODE_CHECK_CHUNK if words.device.type == "cpu" else max(words.numel(), 1)  # one sync on a GPU
    buffer = torch.empty(min(words.numel(), step), dtype=words.dtype, device=words.device)
    for start in range(0, words.numel(), step):
        chunk = words[start:start + step]
        hits = buffer[: chunk.numel()]
        torch.bitwise_right_shift(chunk, 1, out=hits)
        hits &= chunk
        hits &= mask
        if bool(hits.any()):
            return True
    return False


def check_packed_values(model, where: str) -> None:
    """Refuse packed projections whose bytes hold the invalid code 3 or whose ``weight_scale`` is not > 0 and finite.

    One vectorised pass over each packed tensor (the codes are otherwise read as +2 without complaint, and a
    NaN / 0 / negative / inf scale gives silently wrong logits). Raises :class:`BitNetCheckpointError` naming
    the tensor.
    """
    base = model._base_model()
    prefix = "" if base is model else "model."
    packed = [(f"{prefix}{name}", m) for name, m in base.projections() if isinstance(m, PackedBitLinear)]
    if not packed:
        return
    with torch.no_grad():
        scales = torch.cat([m.weight_scale.detach().reshape(-1).float() for _, m in packed])
        bad = ~(torch.isfinite(scales) & (scales > 0))
        if bool(bad.any()):
            name, module = packed[int(bad.nonzero()[0, 0])]
            raise BitNetCheckpointError(
                f"{where}: {name}.weight_scale is {module.weight_scale.reshape(-1)[0].item()}; a packed projection's "
                "scale must be a positive finite number (the checkpoint is corrupt)"
            )
        for name, module in packed:
            if module.weight.device.type != "meta" and _packed_bytes_hold_code_3(module.weight):
                raise BitNetCheckpointError(
                    f"{where}: {name}.weight holds the 2-bit code 3, which SPEC §3 never writes (it would be read "
                    "as +2): the checkpoint is corrupt"
                )


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def _load_config(cls, path, kwargs: dict, hub_kwargs: dict) -> tuple[BitNetConfig, dict]:
    """Read the config like ``AutoModel.from_pretrained`` does; refuse one that is not ``model_type: bitnet``."""
    config = kwargs.pop("config", None)
    try:
        if isinstance(config, BitNetConfig):
            return copy.deepcopy(config), kwargs
        if isinstance(config, PretrainedConfig):
            if config.model_type != "bitnet":
                raise BitNetCheckpointError(f"config has model_type {config.model_type!r}, not 'bitnet'")
            return BitNetConfig.from_dict(config.to_dict()), kwargs
    except (TypeError, ValueError, StrictDataclassError) as exc:
        if isinstance(exc, BitNetCheckpointError):
            raise
        raise BitNetCheckpointError(f"invalid BitNet config: {exc}") from exc
    config_path = config if config is not None else path
    if config_path is None:
        raise ValueError("from_pretrained(None, ...) needs config= (and state_dict=) as in Transformers")
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
    except (TypeError, ValueError, StrictDataclassError) as exc:
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
    state_dict = kwargs.get("state_dict")
    if state_dict is not None and pretrained_model_name_or_path is not None:
        raise ValueError(
            "from_pretrained takes either a checkpoint path or state_dict= (with path None and config=), not both"
        )
    if state_dict is None and pretrained_model_name_or_path is None:
        raise ValueError("from_pretrained(None, ...) needs state_dict= and config= (as in Transformers)")
    if state_dict is not None and kwargs.get("config") is None:
        raise ValueError("from_pretrained(None, state_dict=...) needs config= (as in Transformers)")
    if state_dict is None:
        kwargs["use_safetensors"] = True
    hub_kwargs = {name: kwargs[name] for name in _HUB_KWARGS if kwargs.get(name) is not None}
    config, kwargs = _load_config(cls, pretrained_model_name_or_path, kwargs, hub_kwargs)

    if state_dict is not None:
        where = "state_dict"
        if not isinstance(state_dict, dict):
            raise BitNetCheckpointError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
        tensors = inspect_state_dict(state_dict)
    else:
        where = str(pretrained_model_name_or_path)
        tensors = inspect_checkpoint(resolve_safetensors_files(pretrained_model_name_or_path, **hub_kwargs))
    check_checkpoint_tensors(tensors, config, where)

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
    _report_loading_info(info, where, model)
    if stored_packed:
        check_packed_values(model, where)
    model._apply_int8_options()
    return (model, info) if user_wants_info else model


def _report_loading_info(info: dict, where: str, model) -> None:
    """Warn about initialised (missing) and ignored (unexpected) tensors; refuse skipped mismatched ones.

    As in Transformers, a tensor the checkpoint lacks is initialised (``_init_weights``: packed projections get
    random ternary codes) and listed in ``missing_keys``; a tied ``lm_head`` is not missing.
    """
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        details = "; ".join(f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in list(mismatched)[:5])
        raise BitNetCheckpointError(f"{where}: tensor shapes do not match the config: {details}")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        logger.warning(
            "%s: %d tensors of %s are missing from the checkpoint and were newly initialised (train them "
            "before use), e.g. %s", where, len(missing), type(model).__name__, missing[:5],
        )
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


def _with_variant(name: str, variant: str | None) -> str:
    """``model.safetensors`` -> ``model.<variant>.safetensors`` (Transformers' naming of weight variants)."""
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def stale_weight_files(variant: str | None = None) -> Callable[[str], bool]:
    """Predicate for :func:`~bitnet_torch._atomic.atomic_directory`'s ``drop_old``: is ``name`` a weight file
    (single file, shard or index) of ``variant`` that an earlier save wrote and a new save must not keep?"""
    weights, index = _with_variant(_SAFE_NAME, variant), _with_variant(_SAFE_INDEX, variant)
    shard = re.compile(re.escape(weights[: -len(".safetensors")]) + r"-\d{5}-of-\d{5}\.safetensors")
    return lambda name: name in (weights, index) or shard.fullmatch(name) is not None


def save_pretrained(model, save_directory, packed: bool | None = None, **kwargs) -> None:
    """Implementation of :meth:`BitNetForCausalLM.save_pretrained` (see its docstring).

    All or nothing: everything is written into a hidden directory beside ``save_directory``
    (:func:`bitnet_torch._atomic.atomic_directory`), which replaces it in one step once complete. An existing
    directory keeps its other files (tokenizer, README, ...) as in Transformers, except the weight files of an
    earlier save; on failure nothing of the new save remains and the old checkpoint is untouched.
    """
    if kwargs.get("safe_serialization") is False:
        raise ValueError("bitnet_torch saves safetensors only (safe_serialization=False is refused)")
    kwargs.pop("safe_serialization", None)
    if kwargs.get("push_to_hub"):
        raise ValueError(
            "save_pretrained(push_to_hub=True) is not supported by bitnet_torch (the save is written atomically to a "
            "local folder): save, then upload the folder with huggingface_hub.upload_folder"
        )
    if packed is None:
        packed = model.is_packed
    if any(isinstance(m, BitLinear) and m.lambda_ < 1.0 for m in model.modules()):
        logger.warning("saving a model in the lambda warm-up (lambda < 1): the checkpoint's forward is fully quantized")
    if os.path.isfile(save_directory):
        raise NotADirectoryError(f"save_pretrained: {save_directory} is a file, not a directory")
    if not model.should_save_on_this_rank(kwargs.get("is_main_process", True)):
        os.makedirs(save_directory, exist_ok=True)  # what Transformers does on the other ranks
        return
    state_dict = checkpoint_state_dict(model, packed, kwargs.pop("state_dict", None))
    saved_form = dict(PACKED_QUANTIZATION_CONFIG if packed else MASTER_QUANTIZATION_CONFIG)
    current_form = model.config.quantization_config
    model.config.quantization_config = saved_form
    try:
        with atomic_directory(save_directory, drop_old=stale_weight_files(kwargs.get("variant"))) as partial:
            PreTrainedModel.save_pretrained(model, partial, state_dict=state_dict, **kwargs)
    finally:
        model.config.quantization_config = current_form
