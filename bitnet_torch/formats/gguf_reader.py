"""Read BitNet GGUF files (``i2_s``, ``tq2_0``, ``tq1_0``, ``f16``) into our packed checkpoint layout.

The ternary projections come back exactly; a ``token_embd`` stored as ``Q6_K`` (``export_gguf(...,
embedding_type="q6_k")``, or another converter's k-quant) comes back dequantized by ``gguf.quants``: Q6_K is
lossy, so such a model is not the exported checkpoint (its embedding and tied head are off by about 2% RMS, up to
about 1/56 of each 256-value block's largest magnitude: :mod:`bitnet_torch.formats.q6_k`).

This is the reading half of GGUF, below ``models`` (whose ``BitNetForCausalLM.from_gguf`` uses it);
the writing half is :mod:`bitnet_torch.export.gguf`, above. :class:`BitNetGGUFReader` is the ``gguf``
package's reader plus bitnet.cpp's I2_S tensors (type 36, which the stock ``gguf.GGUFReader`` refuses).

Every size taken from a file is checked against the tensors the file really holds before anything is
allocated from it (a config that claims 10^7 layers is refused at once), and a truncated or corrupt
file gives one :class:`~bitnet_torch.formats.gguf_layout.GGUFError` naming the file and what is wrong.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ..packing import pack_ternary
from .gguf_layout import (
    ARCH_ACTIVATION,
    GGUF_ARCHITECTURES,
    KEY_HF_CONFIG,
    KEY_SCALE_NAMES,
    KEY_SCALES,
    GGUFError,
    check_config_against_shapes,
    gguf_to_hf_name,
    is_projection,
)
from .ternary import I2_S_TYPE_ID, i2_s_nbytes, ternary_from_f16, unpack_i2_s, unpack_tq1_0, unpack_tq2_0

__all__ = ["BitNetGGUFReader", "field_value", "load_gguf", "model_from_gguf", "open_gguf", "read_ternary"]

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: What the ``gguf`` reader raises on a truncated or malformed file (it does not wrap its own errors).
_READ_ERRORS = (ValueError, OSError, IndexError, KeyError, struct.error, UnicodeDecodeError, OverflowError, TypeError)


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


def open_gguf(path: str | os.PathLike) -> BitNetGGUFReader:
    """Open ``path`` with :class:`BitNetGGUFReader`; a missing, truncated or non-GGUF file raises :class:`GGUFError`."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"GGUF file not found: {path}")
    try:
        return BitNetGGUFReader(path)
    except _READ_ERRORS as exc:
        raise GGUFError(
            f"{path} is not a readable GGUF file (truncated or corrupt header, key/value or tensor-info section): "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def field_value(reader: gguf.GGUFReader, key: str) -> Any:
    """The value of metadata key ``key`` (``None`` when absent)."""
    fld = reader.get_field(key)
    return None if fld is None else fld.contents()


def read_ternary(tensor: gguf.ReaderTensor) -> tuple[np.ndarray, float]:
    """``(w_t [N, K], scale)`` of a projection tensor in any of the four types.

    Raises :class:`GGUFError` naming the tensor for another type, truncated data, the unused code 3 or
    block scales that are not one per-matrix scale.
    """
    k = int(tensor.shape[0])
    n = int(tensor.n_elements) // k
    kind = int(tensor.tensor_type)
    try:
        if kind == I2_S_TYPE_ID:
            return unpack_i2_s(tensor.data, n, k)
        if kind == gguf.GGMLQuantizationType.TQ2_0:
            return unpack_tq2_0(tensor.data, n, k)
        if kind == gguf.GGMLQuantizationType.TQ1_0:
            return unpack_tq1_0(tensor.data, n, k)
        if kind in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
            return ternary_from_f16(np.asarray(tensor.data).reshape(n, k))
    except ValueError as exc:
        raise GGUFError(f"tensor {tensor.name}: {exc}") from exc
    raise GGUFError(
        f"tensor {tensor.name} has type {gguf.GGMLQuantizationType(kind).name}, not a ternary type "
        f"(I2_S, TQ1_0, TQ2_0, F16/F32): re-export it from the checkpoint"
    )


def _config_from_metadata(reader: gguf.GGUFReader, arch: str, vocab_size: int, path: Path) -> dict:
    """A Transformers BitNet config rebuilt from standard GGUF keys (files written by other converters).

    The FFN activation is the one the architecture's graph computes (``bitnet``: SiLU, else squared ReLU).
    """

    def key(suffix: str, required: bool = False) -> Any:
        value = field_value(reader, f"{arch}.{suffix}")
        if value is None and required:
            raise GGUFError(f"{path} has no {arch}.{suffix} (and no {KEY_HF_CONFIG}): cannot rebuild the config")
        return value

    hidden = int(key("embedding_length", True))
    heads = int(key("attention.head_count", True))
    config = {
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length", True)),
        "num_hidden_layers": int(key("block_count", True)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv") or heads),
        "max_position_embeddings": int(key("context_length") or 4096),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon") or 1e-5),
        "rope_theta": float(key("rope.freq_base") or 500000.0),
        "hidden_act": ARCH_ACTIVATION[arch],
        "torch_dtype": "bfloat16",
    }
    if key("attention.key_length") is not None:
        config["head_dim"] = int(key("attention.key_length"))
    for typ in ("bos", "eos", "pad"):
        token_id = field_value(reader, f"tokenizer.ggml.{typ}_token_id")
        if token_id is not None:
            config[f"{typ}_token_id"] = int(token_id)
    return config


def _stored_config(reader: gguf.GGUFReader, path: Path) -> dict | None:
    """The ``config.json`` embedded by our exporter, parsed; ``None`` when the file has none."""
    fld = reader.get_field(KEY_HF_CONFIG)
    if fld is None:
        return None
    try:
        config = json.loads(fld.contents())
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
        raise GGUFError(f"{path}: {KEY_HF_CONFIG} is not valid JSON ({exc}); re-export the file") from exc
    if not isinstance(config, dict):
        raise GGUFError(f"{path}: {KEY_HF_CONFIG} is a JSON {type(config).__name__}, not an object")
    return config


def _config_dtype(config: dict) -> torch.dtype:
    name = str(config.get("torch_dtype") or config.get("dtype") or "float32").replace("torch.", "")
    return _TORCH_DTYPES.get(name, torch.float32)


def _hf_shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    """The Transformers ``[out, in]`` shape of a GGUF tensor (GGUF lists dims innermost first)."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def load_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a BitNet GGUF into ``(config, state_dict)`` in our packed checkpoint layout (SPEC §3).

    Projections become uint8 ``weight`` ``[N/4, K]`` + ``weight_scale`` ``[1]`` (multiply convention,
    ``quantization_config.linear_class = "autobitlinear"``, ``quantization_mode = "offline"``); the exact
    scales written by our exporter are used when present, else the file's own (fp16 block / fp32 I2_S /
    F16 magnitude). Other tensors come back as float tensors in the config's dtype; a quantized one (a ``Q6_K``
    ``token_embd``, say) is dequantized with ``gguf.quants`` — lossy, not the values that were exported. The
    config is the embedded ``config.json`` when present, else rebuilt from the standard keys; either way it is checked
    against the tensors (layers, sizes, heads) before any tensor is decoded.
    Raises :class:`GGUFError` for a missing, truncated or corrupt file, a non-BitNet architecture, a
    config that contradicts the tensors, or a projection in a non-ternary type.
    """
    path = Path(path)
    reader = open_gguf(path)
    arch = field_value(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise GGUFError(f"{path} holds architecture {arch!r}, not a BitNet one ({', '.join(GGUF_ARCHITECTURES)})")
    hf_names: dict[str, str] = {}
    for tensor in reader.tensors:
        mapped = gguf_to_hf_name(tensor.name)
        if mapped is None:
            raise GGUFError(f"{path}: tensor {tensor.name!r} is not part of the BitNet architecture")
        hf_names[tensor.name] = mapped[0]
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise GGUFError(f"{path} has no token_embd.weight")
    vocab_size = int(by_name["token_embd.weight"].shape[1])
    config = _stored_config(reader, path)
    source = f"the {KEY_HF_CONFIG} of {path}"
    if config is None:
        try:
            config = _config_from_metadata(reader, arch, vocab_size, path)
        except (TypeError, ValueError, OverflowError) as exc:
            if isinstance(exc, GGUFError):
                raise
            raise GGUFError(f"{path}: a {arch}.* size key is not a number ({exc}): corrupt metadata") from exc
        source = f"the metadata of {path}"
    check_config_against_shapes(config, {hf_names[t.name]: _hf_shape(t) for t in reader.tensors}, source)
    config["quantization_config"] = {
        **(config.get("quantization_config") or {}),
        "quant_method": "bitnet",
        "linear_class": "autobitlinear",
        "quantization_mode": "offline",
    }
    config["tie_word_embeddings"] = "output.weight" not in by_name
    dtype = _config_dtype(config)
    exact_names = field_value(reader, KEY_SCALE_NAMES) or []
    exact_scales = dict(zip(exact_names, field_value(reader, KEY_SCALES) or []))
    state_dict: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        hf_name = hf_names[tensor.name]
        if is_projection(tensor.name):
            w_t, scale = read_ternary(tensor)
            scale = float(exact_scales.get(tensor.name, scale))
            state_dict[hf_name] = pack_ternary(torch.from_numpy(w_t))
            state_dict[hf_name + "_scale"] = torch.tensor([scale], dtype=torch.float32).to(dtype)
            continue
        kind = int(tensor.tensor_type)
        shape = _hf_shape(tensor)
        try:
            if kind not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
                values = gguf.quants.dequantize(tensor.data, gguf.GGMLQuantizationType(kind))
            else:
                values = np.asarray(tensor.data, dtype=np.float32)
            array = np.array(values, dtype=np.float32).reshape(shape)
        except (ValueError, NotImplementedError) as exc:
            raise GGUFError(f"{path}: tensor {tensor.name} cannot be read ({exc}): truncated or corrupt file") from exc
        state_dict[hf_name] = torch.from_numpy(array).to(dtype)
    return config, state_dict


def model_from_gguf(path: str | os.PathLike, model_class: type, **from_pretrained_kwargs: Any):
    """Build ``model_class`` (``BitNetForCausalLM``, packed) from a BitNet GGUF file.

    The implementation of ``BitNetForCausalLM.from_gguf`` (the class is passed in: this module sits below
    ``models``). Goes through the class's own ``from_pretrained`` on a temporary packed checkpoint, so
    loading follows exactly the path of a saved packed model; a ``Q6_K`` ``token_embd`` is dequantized (lossy, see
    :func:`load_gguf`). Raises :class:`GGUFError` like :func:`load_gguf`.
    """
    from safetensors.torch import save_file

    config, state_dict = load_gguf(path)
    with tempfile.TemporaryDirectory(prefix="bitnet_gguf_") as tmp:
        Path(tmp, "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(Path(tmp, "model.safetensors")))
        return model_class.from_pretrained(tmp, **from_pretrained_kwargs)
