"""Reports which implementation backs ``torch.ops.bitnet`` (compiled kernels or the fallback)."""

from __future__ import annotations

from typing import Any

import torch

from . import _build, ops

__all__ = ["backend_info", "cpu_isa", "set_cpu_isa", "available_cpu_isas"]


def _has_isa_ops() -> bool:
    return ops.extension_loaded() and hasattr(torch.ops.bitnet, "_cpu_isa")


def cpu_isa() -> str | None:
    """The instruction set the CPU kernels use ("scalar", "avx2", "avx512", "amx"); None with the fallback."""
    return torch.ops.bitnet._cpu_isa("") if _has_isa_ops() else None


def available_cpu_isas() -> list[str]:
    """Every instruction set this CPU can run the kernels with, slowest first (empty with the fallback)."""
    return list(torch.ops.bitnet._cpu_isa_available()) if _has_isa_ops() else []


def set_cpu_isa(isa: str) -> str:
    """Force the CPU kernels onto ``isa`` ("scalar", "avx2", "avx512", "amx", or "auto" for the fastest).

    Returns the active instruction set. Raises ``RuntimeError`` when the compiled extension is not loaded
    or the CPU does not support ``isa``, ``ValueError`` for an unknown name. The start-up choice can also be
    made with the environment variable ``BITNET_TORCH_CPU_ISA``.
    """
    if not _has_isa_ops():
        raise RuntimeError(f"the compiled CPU kernels are not loaded ({ops.extension_error()})")
    return torch.ops.bitnet._cpu_isa(isa)


def backend_info(model: Any = None) -> dict[str, Any]:
    """Describe the active backend (and, given a model, the decode path its ``generate()`` takes).

    Keys: ``backend`` (``"extension"`` or ``"fallback"``), ``reason`` (why the fallback is used, else None),
    ``cpu_isa`` (active CPU instruction set, None with the fallback), ``cpu_isas`` (supported ones),
    ``extension_path`` (the loaded library), ``cuda`` (a GPU is visible), ``cuda_kernels`` (the extension
    has compiled CUDA kernels), ``torch`` (version), ``threads`` (``torch.get_num_threads()``).
    """
    loaded = ops.extension_loaded()
    path = _build.loaded_library_path()
    info: dict[str, Any] = {
        "backend": "extension" if loaded else "fallback",
        "reason": ops.extension_error(),
        "cpu_isa": cpu_isa(),
        "cpu_isas": available_cpu_isas(),
        "extension_path": str(path) if path is not None else None,
        "cuda": torch.cuda.is_available(),
        "cuda_kernels": loaded and ops._has_compiled_cuda_kernels(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if model is not None:
        # The model says (BitNetForCausalLM.decode_path); this module sits below models and does not import them.
        path, reason = model.decode_path() if hasattr(model, "decode_path") else ("eager", "not a bitnet_torch model")
        info["decode_path"] = path
        info["decode_path_reason"] = reason
    return info
