"""Read a BitNet checkpoint directory at the state-dict level (no model class needed).

A directory holds ``config.json`` and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``). The seven projections of each decoder layer come in one of two forms
(SPEC §3): packed (uint8 ``weight`` ``[N/4, K]`` + ``weight_scale``, whose meaning follows
``quantization_config.linear_class``) or float master weights (quantized here with
:func:`bitnet_torch.quantize_weight`). Either way :func:`iter_checkpoint_tensors` yields the int8 ternary
matrix and its scale in the multiply convention (``mean|W|``). This reads checkpoints written by
``bitnet_torch`` and by plain Transformers alike. Only safetensors is read (never pickle).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from ..nn.packed import LINEAR_CLASS_TO_CONVENTION
from ..packing import unpack_ternary
from ..quant import quantize_weight

__all__ = [
    "CheckpointError",
    "CheckpointTensor",
    "PROJECTION_PATTERN",
    "read_config",
    "safetensors_files",
    "iter_checkpoint_tensors",
]

#: Names of the ternary projections in a Transformers BitNet / Llama-style checkpoint.
PROJECTION_PATTERN = re.compile(
    r"^model\.layers\.(\d+)\.(self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)\.(weight|weight_scale)$"
)


class CheckpointError(ValueError):
    """A checkpoint directory is missing a file or holds something this exporter cannot represent."""


@dataclass
class CheckpointTensor:
    """One tensor of the checkpoint: ``ternary`` (int8 ``[N, K]``) + ``scale`` for projections, else ``value``."""

    name: str
    value: torch.Tensor | None = None
    ternary: torch.Tensor | None = None
    scale: float | None = None
    scale_dtype: torch.dtype | None = None

    @property
    def is_ternary(self) -> bool:
        return self.ternary is not None


def read_config(model_dir: Path) -> dict:
    """Return the parsed ``config.json`` of ``model_dir``; raises :class:`CheckpointError` when absent or invalid."""
    config_path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise CheckpointError(f"model directory not found: {model_dir}")
    if not config_path.is_file():
        raise CheckpointError(f"no config.json in {model_dir}: not a Transformers checkpoint directory")
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc


def safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint (single file or the shards of an index), in a stable order."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = sorted({model_dir / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"shards listed in {index.name} are missing: {', '.join(missing)}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise CheckpointError(
            f"{model_dir} holds only pickle weights (*.bin/*.pt); re-save it with safe_serialization=True "
            "(safetensors) — pickle files are never loaded"
        )
    raise CheckpointError(f"no model.safetensors (or model.safetensors.index.json) in {model_dir}")


def _scale_convention(config: dict) -> str:
    quant = config.get("quantization_config") or {}
    linear_class = str(quant.get("linear_class", "autobitlinear")).lower()
    if linear_class not in LINEAR_CLASS_TO_CONVENTION:
        raise CheckpointError(
            f"quantization_config.linear_class={linear_class!r} is unknown; expected one of "
            f"{sorted(LINEAR_CLASS_TO_CONVENTION)}"
        )
    return LINEAR_CLASS_TO_CONVENTION[linear_class]


def iter_checkpoint_tensors(model_dir: Path, config: dict | None = None) -> Iterator[CheckpointTensor]:
    """Yield every tensor of the checkpoint; projections come as ternary + multiply-convention scale.

    Tensors are read one at a time (memory stays near the largest tensor). Raises :class:`CheckpointError`
    for a packed weight without its ``weight_scale``, a ``weight_scale`` without weight, or a packed
    tensor holding the unused code 3, and a ``weight_scale`` that is not finite, negative, or 0 in the divide
    convention (``linear_class: bitlinear``, where the weight is divided by it).
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir) if config is None else config
    convention = _scale_convention(config)
    handles = [safe_open(str(path), framework="pt") for path in safetensors_files(model_dir)]
    location = {name: handle for handle in handles for name in handle.keys()}
    scale_names = {name for name in location if name.endswith(".weight_scale")}
    used_scales: set[str] = set()
    for name in sorted(location, key=_natural_key):
        if name in scale_names:
            continue
        tensor = location[name].get_tensor(name)
        match = PROJECTION_PATTERN.match(name)
        if match is None:
            yield CheckpointTensor(name=name, value=tensor)
            continue
        scale_name = name[: -len("weight")] + "weight_scale"
        if tensor.dtype == torch.uint8:
            if scale_name not in location:
                raise CheckpointError(f"packed weight {name} has no {scale_name} in {model_dir}")
            stored = location[scale_name].get_tensor(scale_name)
            used_scales.add(scale_name)
            try:
                ternary = unpack_ternary(tensor)
            except ValueError as exc:
                raise CheckpointError(f"{name}: {exc}") from exc
            if stored.numel() == 0:
                raise CheckpointError(f"{scale_name} is empty in {model_dir}")
            value = float(stored.float().reshape(-1)[0])
            if not math.isfinite(value) or value < 0 or (value == 0 and convention == "divide"):
                raise CheckpointError(
                    f"{scale_name} is {value} ({convention} convention of linear_class): a BitNet weight scale is a "
                    f"finite {'positive' if convention == 'divide' else 'non-negative'} number; the checkpoint is corrupt"
                )
            scale = 1.0 / value if convention == "divide" else value
            yield CheckpointTensor(name=name, ternary=ternary, scale=scale, scale_dtype=stored.dtype)
        elif tensor.dtype.is_floating_point:
            ternary, scale = quantize_weight(tensor)
            yield CheckpointTensor(name=name, ternary=ternary, scale=float(scale), scale_dtype=tensor.dtype)
        else:
            raise CheckpointError(f"{name} has dtype {tensor.dtype}: expected uint8 (packed) or a float dtype")
    orphans = scale_names - used_scales
    if orphans:
        raise CheckpointError(f"weight_scale tensors without a packed weight: {', '.join(sorted(orphans))}")


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
