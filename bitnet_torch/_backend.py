"""Reports which implementation backs ``torch.ops.bitnet`` (compiled kernels or the fallback)."""

from __future__ import annotations

from typing import Any

import torch

from . import ops

__all__ = ["backend_info"]


def backend_info() -> dict[str, Any]:
    """Describe the active backend: ``{"backend", "reason", "cpu_isa", "cuda", "torch"}``.

    ``backend`` is ``"extension"`` when the compiled kernels are loaded, else ``"fallback"`` with the
    reason in ``reason``.
    """
    loaded = ops.extension_loaded()
    info: dict[str, Any] = {
        "backend": "extension" if loaded else "fallback",
        "reason": ops.extension_error(),
        "cpu_isa": None,
        "cuda": torch.cuda.is_available(),
        "torch": torch.__version__,
    }
    return info
