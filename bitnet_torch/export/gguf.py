"""GGUF export of BitNet b1.58 checkpoints, for bitnet.cpp and llama.cpp (the writing half of GGUF).

:func:`export_gguf` turns a checkpoint directory (``config.json`` + safetensors, packed or float master
weights; no model class needed) into one GGUF file. Reading is below ``models``
(:mod:`bitnet_torch.formats.gguf_reader`: :func:`load_gguf`, :func:`model_from_gguf`, re-exported here).
The seven projections of each layer are stored in the chosen type:

* ``i2_s``  — bitnet.cpp's 2-bit type (one fp32 scale per tensor); rows must be a multiple of 128;
  bitnet.cpp only (type 36 is not an upstream ggml type: the stock ``gguf`` reader cannot open it either,
  :class:`~bitnet_torch.formats.BitNetGGUFReader` can).
* ``tq2_0`` / ``tq1_0`` — llama.cpp's ternary types (256-value blocks, fp16 block scale); rows must be a
  multiple of 256.
* ``f16``   — the dequantized ternary ``W_t * mean|W|``.

A projection whose row length does not fit the type's block is written as F16 instead (as llama.cpp's
converter does) and reported. Embeddings are F16 (or F32, or ggml's ``Q6_K`` k-quant:
:mod:`bitnet_torch.formats.q6_k`, lossy, 6.56 bits per value, rows a multiple of 256 — 2.4x fewer bytes of tied
head to read per token), norms F32; a tied ``lm_head`` is not written (the runtimes reuse ``token_embd``).
An untied ``lm_head`` is refused unless asked: the ``bitnet`` arch refuses a file with ``output.weight`` in both
runtimes, and bitnet.cpp's ``bitnet-b1.58`` / ``bitnet-25`` load it but compute the head with ``token_embd``
(measured: a different model).

**Architecture and FFN activation.** GGUF has no activation key: each runtime's graph for an architecture
name hard-codes it (table in :mod:`bitnet_torch.formats.gguf_layout`). ``bitnet`` is SiLU in both
runtimes (the 1bitLLM models); ``bitnet-b1.58`` / ``bitnet-25`` are squared ReLU, bitnet.cpp only. So the
architecture follows the model's ``hidden_act``: ``relu2`` (BitNet b1.58) → ``bitnet-b1.58`` (bitnet.cpp,
every type); ``silu`` → ``bitnet`` (llama.cpp with tq2_0/tq1_0/f16, bitnet.cpp with every type). An
explicit ``arch`` whose graph computes another activation is refused (``allow_activation_mismatch=True``
writes it anyway, with a note): such a file loads and runs, but computes a different model.

Facts followed (from the public converters): tensor names and metadata keys of llama.cpp's
``BitnetModel`` (``convert_hf_to_gguf.py``) — ``blk.{i}.attn_sub_norm`` / ``ffn_sub_norm``, rope scaling
"linear" with factor 1.0. Neither llama.cpp's ``BitnetModel`` nor bitnet.cpp's converter permutes
``q_proj``/``k_proj``: both runtimes rotate BitNet heads in the half-split (NEOX) order Transformers uses.

Besides the standard keys the file carries ``bitnet_torch.hf_config`` (the checkpoint's config.json)
and the exact per-tensor scales (``bitnet_torch.ternary.names`` / ``.scales``), so that an import is
lossless even where the file format rounds scales to fp16. Runtimes ignore unknown keys.

Writing is all-or-nothing: the file is written to a temporary file beside the output, read back and
verified, then renamed; an existing output is replaced only when asked, and never a file of the source
checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import torch

from ..formats.gguf_layout import (
    ARCH_ACTIVATION,
    ARCH_FOR_ACTIVATION,
    GGUF_ARCHITECTURES,
    GGUF_EMBEDDING_TYPES,
    GGUF_TYPES,
    KEY_HF_CONFIG,
    KEY_SCALE_NAMES,
    KEY_SCALES,
    GGUFError,
    check_config_against_shapes,
    hf_to_gguf_name,
    normalize_activation,
    runtimes_for,
)
from ..formats.gguf_reader import BitNetGGUFReader, open_gguf, read_ternary
from ..formats.gguf_reader import load_gguf as _load_gguf
from ..formats.q6_k import Q6_K_BLOCK, quantize_q6_k
from ..formats.ternary import I2_S_BLOCK, I2_S_TYPE_ID, TQ_BLOCK, pack_i2_s, pack_tq1_0, pack_tq2_0
from .checkpoint import CheckpointTensor, iter_checkpoint_tensors, read_config, safetensors_files
from .tokenizer_metadata import read_tokenizer_metadata

__all__ = [
    "GGUF_TYPES",
    "GGUF_ARCHITECTURES",
    "GGUF_EMBEDDING_TYPES",
    "GGUFExportError",
    "GGUFExportReport",
    "default_arch",
    "export_gguf",
    "load_gguf",
    "model_from_gguf",
    "verify_gguf",
    "BitNetGGUFReader",
]

logger = logging.getLogger(__name__)

GGUFType = Literal["i2_s", "tq2_0", "tq1_0", "f16"]
EmbeddingType = Literal["f16", "f32", "q6_k"]
#: ``general.file_type`` per type (llama.cpp ``llama_ftype``; 40 = bitnet.cpp ``LLAMA_FTYPE_MOSTLY_I2_S``).
_FILE_TYPE = {
    "i2_s": 40,
    "tq2_0": int(gguf.LlamaFileType.MOSTLY_TQ2_0),
    "tq1_0": int(gguf.LlamaFileType.MOSTLY_TQ1_0),
    "f16": int(gguf.LlamaFileType.MOSTLY_F16),
}
_ROW_BLOCK = {"i2_s": I2_S_BLOCK, "tq2_0": TQ_BLOCK, "tq1_0": TQ_BLOCK, "f16": 1}

#: Errors of export and import are one class (kept under its historical name).
GGUFExportError = GGUFError


@dataclass
class GGUFExportReport:
    """What :func:`export_gguf` wrote (``runtimes``: those that load the file and compute the model's function)."""

    path: Path
    arch: str
    type: str
    activation: str = "relu2"
    runtimes: tuple[str, ...] = ()
    tensor_types: dict[str, int] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verified_ternary_tensors: int = 0
    n_bytes: int = 0


def default_arch(hidden_act: str | None) -> str | None:
    """The GGUF architecture whose runtime graph computes ``hidden_act`` (``None``: no runtime does)."""
    return ARCH_FOR_ACTIVATION.get(normalize_activation(hidden_act))


def choose_arch(hidden_act: str | None, gguf_type: str, arch: str | None, allow_activation_mismatch: bool) -> str:
    """The architecture to write for a model with ``hidden_act``; refuses one whose runtimes compute another FFN.

    Raises :class:`GGUFExportError` naming the runtimes, the architecture and both activations unless
    ``allow_activation_mismatch``.
    """
    activation = normalize_activation(hidden_act)
    if arch is not None and arch not in GGUF_ARCHITECTURES:
        raise GGUFExportError(f"unknown architecture {arch!r}; choose one of {', '.join(GGUF_ARCHITECTURES)}")
    wanted = ARCH_FOR_ACTIVATION.get(activation)
    chosen = arch or wanted or ("bitnet-b1.58" if gguf_type == "i2_s" else "bitnet")
    graph = ARCH_ACTIVATION[chosen]
    if graph == activation:
        return chosen
    runtimes = " and ".join(runtimes_for(gguf_type, chosen)) or "no runtime"
    if wanted is None:
        fix = "no GGUF BitNet architecture computes it (the runtimes know only silu and relu2)"
    else:
        fix = f"write arch {wanted!r} instead (runs in {' and '.join(runtimes_for(gguf_type, wanted)) or 'no runtime'}"
        fix += " with this type)" if runtimes_for(gguf_type, wanted) else f" — not with type {gguf_type})"
        if activation == "relu2" and chosen == "bitnet":
            fix += "; upstream llama.cpp has no squared-ReLU BitNet architecture"
    message = (
        f"the model's FFN activation is {activation!r}, but {runtimes} run arch {chosen!r} with a hard-coded "
        f"{graph!r} FFN: the file would load and compute a different model; {fix}"
    )
    if not allow_activation_mismatch:
        raise GGUFExportError(message + " (allow_activation_mismatch=True / --allow-activation-mismatch writes it anyway)")
    logger.warning("%s", message)
    return chosen


def _check_output_path(out_path: Path, model_dir: Path, overwrite: bool) -> None:
    """Refuse an output that is a directory, a file of the source checkpoint, or exists without ``overwrite``."""
    if out_path.is_dir():
        raise GGUFExportError(f"output {out_path} is a directory; give a file path ending in .gguf")
    if not out_path.exists():
        return
    for source in model_dir.iterdir():
        if source.is_file() and os.path.samefile(source, out_path):
            raise GGUFExportError(
                f"output {out_path} is {source.name} of the source checkpoint {model_dir}: refusing to overwrite "
                "the checkpoint being exported (choose another output path)"
            )
    if not overwrite:
        raise GGUFExportError(f"output {out_path} already exists; pass overwrite=True (--overwrite) to replace it")


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


def _embedding_array(
    tensor: CheckpointTensor, gguf_name: str, embedding_type: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """Bytes + ``add_tensor`` kwargs of ``token_embd`` / ``output`` in ``embedding_type`` (F16, F32 or Q6_K)."""
    if embedding_type != "q6_k":
        return _float_array(tensor.value, embedding_type == "f16"), {}
    values = tensor.value.detach().to(torch.float32).numpy()
    if values.ndim != 2 or values.shape[1] % Q6_K_BLOCK != 0:
        raise GGUFExportError(
            f"{gguf_name} ({tensor.name}, shape {tuple(values.shape)}): embedding_type 'q6_k' needs the hidden size "
            f"(its row length, {values.shape[-1]}) to be a multiple of {Q6_K_BLOCK} (Q6_K's block); "
            "use embedding_type 'f16' or 'f32'"
        )
    def progress(starts):  # a bar while the export logs at INFO (as gguf's writer shows one for the tensors)
        from tqdm.auto import tqdm

        return tqdm(starts, desc=f"Q6_K {gguf_name}", unit="chunk", leave=False)

    try:
        data = quantize_q6_k(values, progress=progress if logger.isEnabledFor(logging.INFO) else None)
    except ValueError as exc:
        raise GGUFExportError(f"{gguf_name} ({tensor.name}) cannot be written as Q6_K: {exc}") from exc
    return data, {"raw_dtype": gguf.GGMLQuantizationType.Q6_K}


@dataclass
class _CollectedTensors:
    """The GGUF tensors of a checkpoint, ready to write, and the exact scale of every ternary one."""

    tensors: list[tuple[str, np.ndarray, dict[str, Any]]] = field(default_factory=list)
    scale_names: list[str] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


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
        out.shapes[tensor.name] = tuple((tensor.ternary if tensor.is_ternary else tensor.value).shape)
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
            data, kwargs = _embedding_array(tensor, gguf_name, embedding_type)
            written = embedding_type
        else:
            data, kwargs, written = _float_array(tensor.value, as_f16=False), {}, "f32"
        out.tensors.append((gguf_name, data, kwargs))
        report.tensor_types[written] = report.tensor_types.get(written, 0) + 1
    return out


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _drop_tied_head(collected: _CollectedTensors, report: GGUFExportReport, embedding_type: str) -> str | None:
    """Remove ``output.weight`` when it equals ``token_embd`` (a tied head saved twice); return it if it stays."""
    by_name = {name: data for name, data, _ in collected.tensors}
    if "output.weight" not in by_name:
        return None
    embed = by_name.get("token_embd.weight")
    if embed is not None and embed.shape == by_name["output.weight"].shape and np.array_equal(embed, by_name["output.weight"]):
        collected.tensors = [t for t in collected.tensors if t[0] != "output.weight"]
        report.tensor_types[embedding_type] -= 1
        return None
    return "output.weight"


def export_gguf(
    model_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    type: GGUFType = "i2_s",  # noqa: A002 - the option's name in the CLI and the issue
    *,
    arch: str | None = None,
    pre_tokenizer: str | None = None,
    embedding_type: EmbeddingType = "f16",
    name: str | None = None,
    verify: bool = True,
    extra_metadata: bool = True,
    overwrite: bool = False,
    allow_activation_mismatch: bool = False,
    allow_untied_head: bool = False,
) -> GGUFExportReport:
    """Write the checkpoint in ``model_dir`` as one GGUF file at ``out_path``; returns a report.

    ``type`` picks the storage of the ternary projections (see the module docstring), ``embedding_type`` that of
    ``token_embd`` (the tied head): ``"f16"``, ``"f32"`` or ``"q6_k"`` (lossy, hidden size a multiple of 256;
    counted in ``report.tensor_types`` like the others). ``arch`` defaults
    to the architecture whose runtime graph computes the model's ``hidden_act`` (``relu2`` →
    ``bitnet-b1.58``, ``silu`` → ``bitnet``); an ``arch`` that computes another activation is refused
    unless ``allow_activation_mismatch``. An untied ``lm_head`` is refused unless ``allow_untied_head`` (no
    runtime computes it: the ``bitnet`` arch refuses ``output.weight``, bitnet.cpp's ``bitnet-b1.58`` /
    ``bitnet-25`` ignore it and use ``token_embd``); a tied head saved twice is written once. ``pre_tokenizer`` overrides the detected ``tokenizer.ggml.pre``.
    With ``verify`` (default) the file is read back and every ternary weight is compared bit-exactly with
    the checkpoint before the file takes its name. ``extra_metadata=False`` writes only the standard keys
    (no ``bitnet_torch.*``: an import then rebuilds the config from the standard keys and takes the scales
    from the tensors). An existing ``out_path`` is replaced only with ``overwrite``, and never when it is a
    file of the checkpoint being exported.

    Raises (all ``ValueError``) :class:`CheckpointError` for a missing or invalid checkpoint,
    ``TokenizerMetadataError`` for a tokenizer llama.cpp cannot run, and :class:`GGUFExportError` for a
    model that is not BitNet, an unknown type/arch, an activation the architecture does not compute, a
    config that contradicts the tensors, tensors the BitNet GGUF architecture cannot hold, an embedding
    ``q6_k`` cannot hold (hidden size not a multiple of 256, NaN or infinite values), or an output path it
    must not write. All-or-nothing: the file is written to a temporary file in the output's
    directory and renamed at the end; on any failure (``KeyboardInterrupt`` included) the temporary file is
    removed and an existing ``out_path`` is left as it was.
    """
    model_dir, out_path = Path(model_dir), Path(out_path)
    if type not in GGUF_TYPES:
        raise GGUFExportError(f"unknown GGUF type {type!r}; choose one of {', '.join(GGUF_TYPES)}")
    if embedding_type not in GGUF_EMBEDDING_TYPES:
        raise GGUFExportError(
            f"embedding_type must be one of {', '.join(map(repr, GGUF_EMBEDDING_TYPES))}, got {embedding_type!r}"
        )
    config = read_config(model_dir)
    if config.get("model_type") != "bitnet":
        raise GGUFExportError(
            f"{model_dir} holds a {config.get('model_type')!r} model, not BitNet (model_type 'bitnet'): convert it "
            "first (`bitnet-torch convert`) and train it as BitNet; quantizing a float model's weights to ternary "
            "without training does not give a working model"
        )
    arch = choose_arch(config.get("hidden_act"), type, arch, allow_activation_mismatch)
    hidden = config.get("hidden_size")
    if embedding_type == "q6_k" and isinstance(hidden, int) and hidden % Q6_K_BLOCK != 0:
        raise GGUFExportError(
            f"embedding_type 'q6_k' needs the hidden size to be a multiple of {Q6_K_BLOCK} (Q6_K stores each "
            f"embedding row in blocks of {Q6_K_BLOCK} values); {model_dir} has hidden_size {hidden}: "
            "use embedding_type 'f16' or 'f32'"
        )
    _check_output_path(out_path, model_dir, overwrite)
    safetensors_files(model_dir)  # refuses a directory without (or with only pickled) weights
    vocab_size = int(_require(config, "vocab_size"))
    tokenizer = read_tokenizer_metadata(model_dir, vocab_size, pre_tokenizer)  # fail before the heavy work
    activation = normalize_activation(config.get("hidden_act"))
    runtimes = runtimes_for(type, arch) if ARCH_ACTIVATION[arch] == activation else ()
    report = GGUFExportReport(path=out_path, arch=arch, type=type, activation=activation, runtimes=runtimes,
                              notes=list(tokenizer.notes))
    if not runtimes:
        report.notes.append(f"no runtime computes this model from the file: arch {arch!r} runs a "
                            f"{ARCH_ACTIVATION[arch]!r} FFN, the model uses {activation!r}")
    collected = _collect_tensors(model_dir, config, type, embedding_type, report)
    check_config_against_shapes(config, collected.shapes, f"config.json of {model_dir}")
    if _drop_tied_head(collected, report, embedding_type) is not None and not allow_untied_head:
        raise GGUFExportError(
            f"{model_dir} has an untied lm_head (its own lm_head.weight): no runtime computes that from a BitNet GGUF "
            "(both runtimes' bitnet arch refuse a file with output.weight; bitnet.cpp's bitnet-b1.58 and bitnet-25 load "
            "it but use token_embd as the head, a different model); allow_untied_head=True (--allow-untied-head) "
            "writes output.weight anyway, for bitnet_torch's own reader only"
        )
    if "output.weight" in {name for name, _, _ in collected.tensors}:
        report.runtimes = ()
        report.notes.append("output.weight (untied lm_head) is written: no runtime computes this model from the file")
    for line in report.fallbacks:
        logger.info("%s", line)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".partial", dir=out_path.parent)
    partial = Path(partial_name)
    writer: gguf.GGUFWriter | None = None
    try:
        os.close(fd)
        writer = gguf.GGUFWriter(partial, arch)
        _add_architecture_metadata(writer, config, vocab_size, name or model_dir.resolve().name)
        writer.add_file_type(_FILE_TYPE[type])
        if type != "f16":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tokenizer.add_to(writer)
        if extra_metadata:
            writer.add_string(KEY_HF_CONFIG, json.dumps(config, sort_keys=True))
            writer.add_array(KEY_SCALE_NAMES, collected.scale_names)
            writer.add_array(KEY_SCALES, collected.scales)
        for gguf_name, data, kwargs in collected.tensors:
            writer.add_tensor(gguf_name, data, **kwargs)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=logger.isEnabledFor(logging.INFO))
        writer.close()
        if verify:
            report.verified_ternary_tensors = verify_gguf(partial, model_dir)
        report.n_bytes = partial.stat().st_size
        os.chmod(partial, 0o666 & ~_current_umask())  # mkstemp makes it private; the export is a normal file
        os.replace(partial, out_path)
    finally:  # also on KeyboardInterrupt: no partial file is left behind
        if writer is not None:
            writer.close()
        partial.unlink(missing_ok=True)
    logger.info("wrote %s (%s, arch %s, %d bytes)", out_path, type, arch, report.n_bytes)
    return report


# -------------------------------------------------------------------------------------------------- verify


def verify_gguf(path: str | os.PathLike, model_dir: str | os.PathLike) -> int:
    """Read ``path`` back and check every ternary projection bit-exactly against the checkpoint in ``model_dir``.

    Returns the number of ternary tensors compared; raises :class:`GGUFExportError` naming the first tensor
    that differs (values, shape, or a scale off by more than the fp16 rounding of the block scale).
    """
    reader = open_gguf(path)
    by_name = {t.name: t for t in reader.tensors}
    compared = 0
    for tensor in iter_checkpoint_tensors(Path(model_dir)):
        if not tensor.is_ternary:
            continue
        gguf_name = hf_to_gguf_name(tensor.name)
        if gguf_name not in by_name:
            raise GGUFExportError(f"{path}: tensor {gguf_name} ({tensor.name}) is missing")
        w_t, scale = read_ternary(by_name[gguf_name])
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


def load_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a BitNet GGUF into ``(config, state_dict)``: :func:`bitnet_torch.formats.gguf_reader.load_gguf`."""
    return _load_gguf(path)


def model_from_gguf(path: str | os.PathLike, **from_pretrained_kwargs: Any):
    """Build ``BitNetForCausalLM`` (packed) from a BitNet GGUF file: ``BitNetForCausalLM.from_gguf``."""
    from ..models import BitNetForCausalLM

    return BitNetForCausalLM.from_gguf(path, **from_pretrained_kwargs)
