"""GGUF export and import of BitNet b1.58 checkpoints, for llama.cpp and bitnet.cpp.

:func:`export_gguf` turns a checkpoint directory (``config.json`` + safetensors, packed or float master
weights; no model class needed) into one GGUF file; :func:`load_gguf` reads such a file back into
``(config, state_dict)`` in our packed checkpoint layout (SPEC §3); :func:`model_from_gguf` builds the
model from it. The seven projections of each layer are stored in the chosen type:

* ``i2_s``  — bitnet.cpp's 2-bit type (one fp32 scale per tensor), architecture ``bitnet-b1.58``
  (the name in Microsoft's published ``ggml-model-i2_s.gguf``); rows must be a multiple of 128.
* ``tq2_0`` / ``tq1_0`` — llama.cpp's ternary types (256-value blocks, fp16 block scale),
  architecture ``bitnet``; rows must be a multiple of 256.
* ``f16``   — the dequantized ternary ``W_t * mean|W|``, architecture ``bitnet``.

A projection whose row length does not fit the type's block is written as F16 instead (as llama.cpp's
converter does) and reported. Embeddings are F16 (or F32), norms F32; a tied ``lm_head`` is not
written (the runtimes reuse ``token_embd``).

Facts followed (from the public converters): tensor names and metadata keys of llama.cpp's
``BitnetModel`` (``convert_hf_to_gguf.py``) — ``blk.{i}.attn_sub_norm`` / ``ffn_sub_norm``, rope scaling
"linear" with factor 1.0. Neither llama.cpp's ``BitnetModel`` (a ``TextModel``, not ``LlamaModel``) nor
bitnet.cpp's converter (its ``permute`` calls are commented out) permutes ``q_proj``/``k_proj``: both
runtimes rotate BitNet heads in the half-split (NEOX) order Transformers uses, so the rows are written in
checkpoint order and nothing is undone on import.

The FFN activation is not stored in GGUF: each runtime graph fixes it. llama.cpp's ``bitnet`` graph (made
for the 1bitLLM models) gates with SiLU; bitnet.cpp's ``bitnet-b1.58`` graph (BitNet b1.58 2B-4T) with
squared ReLU. The export notes a mismatch between the model's ``hidden_act`` and the chosen architecture.

Besides the standard keys the file carries ``bitnet_torch.hf_config`` (the checkpoint's config.json)
and the exact per-tensor scales (``bitnet_torch.ternary.names`` / ``.scales``), so that an import is
lossless even where the file format rounds scales to fp16. Runtimes ignore unknown keys.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import torch

from ..packing import pack_ternary
from .checkpoint import CheckpointError, CheckpointTensor, iter_checkpoint_tensors, read_config, safetensors_files
from .ternary_formats import (
    I2_S_BLOCK,
    I2_S_TYPE_ID,
    TQ_BLOCK,
    i2_s_nbytes,
    pack_i2_s,
    pack_tq1_0,
    pack_tq2_0,
    ternary_from_f16,
    unpack_i2_s,
    unpack_tq1_0,
    unpack_tq2_0,
)
from .tokenizer_metadata import read_tokenizer_metadata

__all__ = [
    "GGUF_TYPES",
    "GGUF_ARCHITECTURES",
    "GGUFExportError",
    "GGUFExportReport",
    "export_gguf",
    "load_gguf",
    "model_from_gguf",
    "verify_gguf",
    "BitNetGGUFReader",
]

logger = logging.getLogger(__name__)

GGUFType = Literal["i2_s", "tq2_0", "tq1_0", "f16"]
#: The ternary storage types :func:`export_gguf` writes.
GGUF_TYPES: tuple[str, ...] = ("i2_s", "tq2_0", "tq1_0", "f16")
#: Architecture names: llama.cpp's ``bitnet``; bitnet.cpp's ``bitnet-b1.58`` (``bitnet-25`` in older trees).
GGUF_ARCHITECTURES: tuple[str, ...] = ("bitnet", "bitnet-b1.58", "bitnet-25")
_DEFAULT_ARCH = {"i2_s": "bitnet-b1.58", "tq2_0": "bitnet", "tq1_0": "bitnet", "f16": "bitnet"}
#: FFN activation each runtime graph hard-codes: llama.cpp's ``bitnet`` graph (1bitLLM models) gates with
#: SiLU; bitnet.cpp's ``bitnet-b1.58`` / ``bitnet-25`` graph (BitNet b1.58 2B-4T) with squared ReLU.
_GRAPH_ACTIVATION = {"bitnet": "silu", "bitnet-b1.58": "relu2", "bitnet-25": "relu2"}
_ARCH_FOR_ACTIVATION = {"silu": "bitnet", "relu2": "bitnet-b1.58"}
#: ``general.file_type`` per type (llama.cpp ``llama_ftype``; 40 = bitnet.cpp ``LLAMA_FTYPE_MOSTLY_I2_S``).
_FILE_TYPE = {
    "i2_s": 40,
    "tq2_0": int(gguf.LlamaFileType.MOSTLY_TQ2_0),
    "tq1_0": int(gguf.LlamaFileType.MOSTLY_TQ1_0),
    "f16": int(gguf.LlamaFileType.MOSTLY_F16),
}
_ROW_BLOCK = {"i2_s": I2_S_BLOCK, "tq2_0": TQ_BLOCK, "tq1_0": TQ_BLOCK, "f16": 1}

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
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
_KEY_HF_CONFIG = "bitnet_torch.hf_config"
_KEY_SCALE_NAMES = "bitnet_torch.ternary.names"
_KEY_SCALES = "bitnet_torch.ternary.scales"
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class GGUFExportError(ValueError):
    """An export or import was refused: the message names the file, tensor or option at fault."""


@dataclass
class GGUFExportReport:
    """What :func:`export_gguf` wrote."""

    path: Path
    arch: str
    type: str
    tensor_types: dict[str, int] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verified_ternary_tensors: int = 0
    n_bytes: int = 0


# --------------------------------------------------------------------------------------------------- names


def hf_to_gguf_name(name: str) -> str | None:
    """GGUF tensor name of a Transformers BitNet tensor name (``None`` when it has no GGUF counterpart)."""
    match = _LAYER_NAME.match(name)
    if match is not None:
        kind = _LAYER_TENSORS.get(match.group(2))
        return None if kind is None else gguf.TENSOR_NAMES[kind].format(bid=int(match.group(1))) + ".weight"
    if name.endswith(".weight") and name[: -len(".weight")] in _GLOBAL_TENSORS:
        return gguf.TENSOR_NAMES[_GLOBAL_TENSORS[name[: -len(".weight")]]] + ".weight"
    return None


def _gguf_to_hf_names(n_layers: int) -> dict[str, str]:
    names = {gguf.TENSOR_NAMES[kind] + ".weight": hf + ".weight" for hf, kind in _GLOBAL_TENSORS.items()}
    for i in range(n_layers):
        for hf, kind in _LAYER_TENSORS.items():
            names[gguf.TENSOR_NAMES[kind].format(bid=i) + ".weight"] = f"model.layers.{i}.{hf}.weight"
    return names


# -------------------------------------------------------------------------------------------------- config


def _rope_theta(config: dict) -> float:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (None, "default"):
        raise GGUFExportError(f"rope scaling {rope_type!r} is not exported (only the default rotary embedding)")
    theta = config.get("rope_theta", params.get("rope_theta"))
    return float(theta) if theta is not None else 500000.0


def _require(config: dict, key: str) -> Any:
    if config.get(key) is None:
        raise GGUFExportError(f"config.json has no {key!r}: not a Llama-style BitNet configuration")
    return config[key]


def _add_architecture_metadata(writer: gguf.GGUFWriter, config: dict, vocab_size: int, name: str) -> None:
    hidden = int(_require(config, "hidden_size"))
    heads = int(_require(config, "num_attention_heads"))
    head_dim = int(config.get("head_dim") or hidden // heads)
    writer.add_name(name)
    writer.add_vocab_size(vocab_size)
    writer.add_context_length(int(config.get("max_position_embeddings") or 4096))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(_require(config, "num_hidden_layers")))
    writer.add_feed_forward_length(int(_require(config, "intermediate_size")))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(1.0)


# -------------------------------------------------------------------------------------------------- export


def _pack_projection(tensor: CheckpointTensor, gguf_type: str) -> tuple[np.ndarray, dict[str, Any], str]:
    """Bytes + ``add_tensor`` kwargs for one ternary projection, and the type actually written."""
    w_t = tensor.ternary.numpy()
    n, k = w_t.shape
    if k % _ROW_BLOCK[gguf_type] != 0:
        gguf_type = "f16"
    if gguf_type == "i2_s":
        return pack_i2_s(w_t, tensor.scale).view(np.int8), {"raw_shape": (n, k), "raw_dtype": I2_S_TYPE_ID}, "i2_s"
    if gguf_type == "tq2_0":
        return pack_tq2_0(w_t, tensor.scale), {"raw_dtype": gguf.GGMLQuantizationType.TQ2_0}, "tq2_0"
    if gguf_type == "tq1_0":
        return pack_tq1_0(w_t, tensor.scale), {"raw_dtype": gguf.GGMLQuantizationType.TQ1_0}, "tq1_0"
    return (w_t.astype(np.float32) * np.float32(tensor.scale)).astype(np.float16), {}, "f16"


def _float_array(tensor: torch.Tensor, as_f16: bool) -> np.ndarray:
    return tensor.detach().to(torch.float32).numpy().astype(np.float16 if as_f16 else np.float32)


@dataclass
class _CollectedTensors:
    """The GGUF tensors of a checkpoint, ready to write, and the exact scale of every ternary one."""

    tensors: list[tuple[str, np.ndarray, dict[str, Any]]] = field(default_factory=list)
    scale_names: list[str] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    vocab_rows: int | None = None


def _collect_tensors(
    model_dir: Path, config: dict, gguf_type: str, embedding_type: str, report: GGUFExportReport
) -> _CollectedTensors:
    """Convert every checkpoint tensor to its GGUF name and bytes (one tensor in memory at a time besides the output)."""
    out = _CollectedTensors()
    for tensor in iter_checkpoint_tensors(model_dir, config):
        gguf_name = hf_to_gguf_name(tensor.name)
        if gguf_name is None:
            raise GGUFExportError(
                f"tensor {tensor.name!r} has no place in the GGUF BitNet architecture (expected Llama-style names "
                "with attn_sub_norm/ffn_sub_norm; BitLinear-internal norms or biases are not supported)"
            )
        if tensor.is_ternary:
            data, kwargs, written = _pack_projection(tensor, gguf_type)
            if written != gguf_type:
                report.fallbacks.append(
                    f"{gguf_name}: row length {tensor.ternary.shape[1]} is not a multiple of "
                    f"{_ROW_BLOCK[gguf_type]}, written as F16"
                )
            out.scale_names.append(gguf_name)
            out.scales.append(float(tensor.scale))
        elif gguf_name.startswith(("token_embd.", "output.")):
            if gguf_name.startswith("token_embd."):
                out.vocab_rows = int(tensor.value.shape[0])
            data, kwargs, written = _float_array(tensor.value, embedding_type == "f16"), {}, embedding_type
        else:
            data, kwargs, written = _float_array(tensor.value, as_f16=False), {}, "f32"
        out.tensors.append((gguf_name, data, kwargs))
        report.tensor_types[written] = report.tensor_types.get(written, 0) + 1
    if out.vocab_rows is None:
        raise GGUFExportError(f"{model_dir} has no model.embed_tokens.weight")
    return out


def export_gguf(
    model_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    type: GGUFType = "i2_s",  # noqa: A002 - the option's name in the CLI and the issue
    *,
    arch: str | None = None,
    pre_tokenizer: str | None = None,
    embedding_type: Literal["f16", "f32"] = "f16",
    name: str | None = None,
    verify: bool = True,
    extra_metadata: bool = True,
) -> GGUFExportReport:
    """Write the checkpoint in ``model_dir`` as one GGUF file at ``out_path``; returns a report.

    ``type`` picks the storage of the ternary projections (see the module docstring); ``arch`` overrides
    the architecture name (default: ``bitnet-b1.58`` for ``i2_s``, else ``bitnet``); ``pre_tokenizer``
    overrides the detected ``tokenizer.ggml.pre``. With ``verify`` (default) the file is read back and
    every ternary weight is compared bit-exactly with the checkpoint. ``extra_metadata=False`` writes only
    the standard keys (no ``bitnet_torch.*``: an import then rebuilds the config from the standard keys and
    takes the scales from the tensors).

    Raises (all ``ValueError``) :class:`CheckpointError` for a missing or invalid checkpoint,
    ``TokenizerMetadataError`` for a tokenizer llama.cpp cannot run, and :class:`GGUFExportError` for a
    model that is not BitNet, an unknown type/arch, or tensors the BitNet GGUF architecture cannot hold.
    The file is written to ``out_path + ".partial"`` and renamed at the end, so a failed export never
    leaves a truncated ``out_path``.
    """
    model_dir, out_path = Path(model_dir), Path(out_path)
    if type not in GGUF_TYPES:
        raise GGUFExportError(f"unknown GGUF type {type!r}; choose one of {', '.join(GGUF_TYPES)}")
    arch = arch or _DEFAULT_ARCH[type]
    if arch not in GGUF_ARCHITECTURES:
        raise GGUFExportError(f"unknown architecture {arch!r}; choose one of {', '.join(GGUF_ARCHITECTURES)}")
    if embedding_type not in ("f16", "f32"):
        raise GGUFExportError(f"embedding_type must be 'f16' or 'f32', got {embedding_type!r}")
    config = read_config(model_dir)
    if config.get("model_type") != "bitnet":
        raise GGUFExportError(
            f"{model_dir} holds a {config.get('model_type')!r} model, not BitNet (model_type 'bitnet'): convert it "
            "first (`bitnet-torch convert`) and train it as BitNet; quantizing a float model's weights to ternary "
            "without training does not give a working model"
        )
    safetensors_files(model_dir)  # refuses a directory without (or with only pickled) weights
    vocab_size = int(_require(config, "vocab_size"))
    tokenizer = read_tokenizer_metadata(model_dir, vocab_size, pre_tokenizer)  # fail before the heavy work
    report = GGUFExportReport(path=out_path, arch=arch, type=type, notes=list(tokenizer.notes))
    activation = config.get("hidden_act", "relu2")
    if activation != _GRAPH_ACTIVATION[arch]:
        report.notes.append(
            f"the model's FFN uses {activation!r} but the runtimes' {arch!r} graph applies "
            f"{_GRAPH_ACTIVATION[arch]!r} (the activation is not stored in GGUF): outputs there will differ; "
            f"choose arch={_ARCH_FOR_ACTIVATION.get(activation, 'bitnet')!r} if that runtime reads this type"
        )
    collected = _collect_tensors(model_dir, config, type, embedding_type, report)
    if collected.vocab_rows != vocab_size:
        raise GGUFExportError(
            f"model.embed_tokens.weight has {collected.vocab_rows} rows but config.json says vocab_size={vocab_size}"
        )
    for line in report.fallbacks:
        logger.info("%s", line)

    partial = out_path.with_name(out_path.name + ".partial")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(partial, arch)
    try:
        _add_architecture_metadata(writer, config, vocab_size, name or model_dir.resolve().name)
        writer.add_file_type(_FILE_TYPE[type])
        if type != "f16":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tokenizer.add_to(writer)
        if extra_metadata:
            writer.add_string(_KEY_HF_CONFIG, json.dumps(config, sort_keys=True))
            writer.add_array(_KEY_SCALE_NAMES, collected.scale_names)
            writer.add_array(_KEY_SCALES, collected.scales)
        for gguf_name, data, kwargs in collected.tensors:
            writer.add_tensor(gguf_name, data, **kwargs)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=logger.isEnabledFor(logging.INFO))
        writer.close()
        os.replace(partial, out_path)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    report.n_bytes = out_path.stat().st_size
    if verify:
        report.verified_ternary_tensors = verify_gguf(out_path, model_dir)
    logger.info("wrote %s (%s, arch %s, %d bytes)", out_path, type, arch, report.n_bytes)
    return report


# -------------------------------------------------------------------------------------------------- reading


class BitNetGGUFReader(gguf.GGUFReader):
    """``gguf.GGUFReader`` that also understands bitnet.cpp's I2_S tensors (type 36, unknown to ``gguf``).

    An I2_S tensor appears in ``tensors`` with ``tensor_type == 36`` and ``data`` the raw uint8 bytes
    (``N*K/4`` packed codes + the 32-byte scale trailer).
    """

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        i2_s_fields = [f for f in fields if int(f.parts[4][0]) == I2_S_TYPE_ID]
        super()._build_tensors(start_offs, [f for f in fields if int(f.parts[4][0]) != I2_S_TYPE_ID])
        for f in i2_s_fields:
            _name_len, name_data, _n_dims, dims, _raw_dtype, offset_tensor = f.parts
            n_elements = int(np.prod(dims))
            k, n = int(dims[0]), n_elements // int(dims[0])
            n_bytes = i2_s_nbytes(n, k)
            data_offs = int(start_offs + offset_tensor[0])
            self.tensors.append(
                gguf.ReaderTensor(
                    name=str(bytes(name_data), encoding="utf-8"),
                    tensor_type=I2_S_TYPE_ID,  # type: ignore[arg-type]
                    shape=dims,
                    n_elements=n_elements,
                    n_bytes=n_bytes,
                    data_offset=data_offs,
                    data=self._get(data_offs, np.uint8, n_bytes),
                    field=f,
                )
            )
        self.tensors.sort(key=lambda t: t.data_offset)


def _field_value(reader: gguf.GGUFReader, key: str) -> Any:
    fld = reader.get_field(key)
    return None if fld is None else fld.contents()


def _read_ternary(tensor: gguf.ReaderTensor) -> tuple[np.ndarray, float]:
    """``(w_t [N, K], scale)`` of a projection tensor in any of the four types (raises for other types)."""
    k = int(tensor.shape[0])
    n = int(tensor.n_elements) // k
    kind = int(tensor.tensor_type)
    if kind == I2_S_TYPE_ID:
        return unpack_i2_s(tensor.data, n, k)
    if kind == gguf.GGMLQuantizationType.TQ2_0:
        return unpack_tq2_0(tensor.data, n, k)
    if kind == gguf.GGMLQuantizationType.TQ1_0:
        return unpack_tq1_0(tensor.data, n, k)
    if kind in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
        return ternary_from_f16(np.asarray(tensor.data).reshape(n, k))
    raise GGUFExportError(
        f"tensor {tensor.name} has type {gguf.GGMLQuantizationType(kind).name}, not a ternary type "
        f"(I2_S, TQ1_0, TQ2_0, F16/F32): re-export it from the checkpoint"
    )


def _is_projection(gguf_name: str) -> bool:
    return re.search(r"\.(attn_[qkv]|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$", gguf_name) is not None


def verify_gguf(path: str | os.PathLike, model_dir: str | os.PathLike) -> int:
    """Read ``path`` back and check every ternary projection bit-exactly against the checkpoint in ``model_dir``.

    Returns the number of ternary tensors compared; raises :class:`GGUFExportError` naming the first tensor
    that differs (values, shape, or a scale off by more than the fp16 rounding of the block scale).
    """
    reader = BitNetGGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    compared = 0
    for tensor in iter_checkpoint_tensors(Path(model_dir)):
        if not tensor.is_ternary:
            continue
        gguf_name = hf_to_gguf_name(tensor.name)
        if gguf_name not in by_name:
            raise GGUFExportError(f"{path}: tensor {gguf_name} ({tensor.name}) is missing")
        w_t, scale = _read_ternary(by_name[gguf_name])
        expected = tensor.ternary.numpy()
        if w_t.shape != expected.shape or not np.array_equal(w_t, expected):
            mismatches = int((w_t != expected).sum()) if w_t.shape == expected.shape else -1
            raise GGUFExportError(
                f"{path}: ternary values of {gguf_name} differ from {tensor.name} "
                f"(shape {w_t.shape} vs {expected.shape}, {mismatches} values differ)"
            )
        if expected.any() and not np.isclose(scale, tensor.scale, rtol=1e-3):
            raise GGUFExportError(f"{path}: scale of {gguf_name} is {scale}, checkpoint has {tensor.scale}")
        compared += 1
    return compared


def _config_from_metadata(reader: gguf.GGUFReader, arch: str, vocab_size: int) -> dict:
    """A Transformers BitNet config rebuilt from standard GGUF keys (files written by other converters)."""

    def key(suffix: str) -> Any:
        return _field_value(reader, f"{arch}.{suffix}")

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    config = {
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv") or heads),
        "max_position_embeddings": int(key("context_length") or 4096),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon") or 1e-5),
        "rope_theta": float(key("rope.freq_base") or 500000.0),
        "hidden_act": "relu2",
        "torch_dtype": "bfloat16",
    }
    if key("attention.key_length") is not None:
        config["head_dim"] = int(key("attention.key_length"))
    for typ in ("bos", "eos", "pad"):
        token_id = _field_value(reader, f"tokenizer.ggml.{typ}_token_id")
        if token_id is not None:
            config[f"{typ}_token_id"] = int(token_id)
    return config


def _config_dtype(config: dict) -> torch.dtype:
    name = str(config.get("torch_dtype") or config.get("dtype") or "float32").replace("torch.", "")
    return _TORCH_DTYPES.get(name, torch.float32)


def load_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a BitNet GGUF into ``(config, state_dict)`` in our packed checkpoint layout (SPEC §3).

    Projections become uint8 ``weight`` ``[N/4, K]`` + ``weight_scale`` ``[1]`` (multiply convention,
    ``quantization_config.linear_class = "autobitlinear"``, ``quantization_mode = "offline"``); the exact
    scales written by :func:`export_gguf` are used when present, else the file's own (fp16 block / fp32
    I2_S / F16 magnitude). Other tensors come back as float tensors in the config's dtype.
    Raises :class:`GGUFExportError` for a missing file, a non-BitNet architecture, or a projection in a
    non-ternary type.
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFExportError(f"GGUF file not found: {path}")
    try:
        reader = BitNetGGUFReader(path)
    except (ValueError, OSError) as exc:
        raise GGUFExportError(f"{path} is not a readable GGUF file: {exc}") from exc
    arch = _field_value(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise GGUFExportError(f"{path} holds architecture {arch!r}, not a BitNet one ({', '.join(GGUF_ARCHITECTURES)})")
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise GGUFExportError(f"{path} has no token_embd.weight")
    vocab_size = int(by_name["token_embd.weight"].shape[1])
    stored_config = _field_value(reader, _KEY_HF_CONFIG)
    config = json.loads(stored_config) if stored_config else _config_from_metadata(reader, arch, vocab_size)
    config["quantization_config"] = {
        **(config.get("quantization_config") or {}),
        "quant_method": "bitnet",
        "linear_class": "autobitlinear",
        "quantization_mode": "offline",
    }
    config["tie_word_embeddings"] = "output.weight" not in by_name
    dtype = _config_dtype(config)
    exact_names = _field_value(reader, _KEY_SCALE_NAMES) or []
    exact_scales = dict(zip(exact_names, _field_value(reader, _KEY_SCALES) or []))
    names = _gguf_to_hf_names(int(config["num_hidden_layers"]))
    state_dict: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        hf_name = names.get(tensor.name)
        if hf_name is None:
            raise GGUFExportError(f"{path}: tensor {tensor.name!r} is not part of the BitNet architecture")
        if _is_projection(tensor.name):
            w_t, scale = _read_ternary(tensor)
            scale = float(exact_scales.get(tensor.name, scale))
            state_dict[hf_name] = pack_ternary(torch.from_numpy(w_t))
            state_dict[hf_name + "_scale"] = torch.tensor([scale], dtype=torch.float32).to(dtype)
        else:
            kind = int(tensor.tensor_type)
            if kind not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
                values = gguf.quants.dequantize(tensor.data, gguf.GGMLQuantizationType(kind))
            else:
                values = np.asarray(tensor.data, dtype=np.float32)
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            state_dict[hf_name] = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape)).to(dtype)
    return config, state_dict


def model_from_gguf(path: str | os.PathLike, **from_pretrained_kwargs: Any):
    """Build ``bitnet_torch.models.BitNetForCausalLM`` (packed) from a BitNet GGUF file.

    The hook for ``BitNetForCausalLM.from_gguf``. Goes through the model class's own ``from_pretrained``
    on a temporary packed checkpoint, so loading follows exactly the path of a saved packed model.
    Raises :class:`GGUFExportError` like :func:`load_gguf`, and ``ImportError`` when the model class is absent.
    """
    from safetensors.torch import save_file

    try:
        from ..models import BitNetForCausalLM
    except ImportError as exc:  # the model class lives in another module of the package
        raise ImportError(f"bitnet_torch.models.BitNetForCausalLM is not available: {exc}") from exc
    config, state_dict = load_gguf(path)
    with tempfile.TemporaryDirectory(prefix="bitnet_gguf_") as tmp:
        Path(tmp, "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(Path(tmp, "model.safetensors")))
        return BitNetForCausalLM.from_pretrained(tmp, **from_pretrained_kwargs)
