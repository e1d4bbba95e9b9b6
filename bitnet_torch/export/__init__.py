"""Exports of BitNet checkpoints to other runtimes: GGUF for bitnet.cpp (I2_S, every type) and llama.cpp (TQ1_0/TQ2_0/F16).

* :func:`export_gguf` — checkpoint directory → one ``.gguf`` file (verified bit-exactly on the way out);
* :func:`load_gguf` / :func:`model_from_gguf` / :class:`BitNetGGUFReader` — reading, re-exported from
  :mod:`bitnet_torch.formats` (below ``models``, which uses it for ``BitNetForCausalLM.from_gguf``).
"""

from __future__ import annotations

from .checkpoint import CheckpointError
from .gguf import (
    GGUF_ARCHITECTURES,
    GGUF_TYPES,
    BitNetGGUFReader,
    GGUFExportError,
    GGUFExportReport,
    default_arch,
    export_gguf,
    load_gguf,
    model_from_gguf,
    verify_gguf,
)

__all__ = [
    "BitNetGGUFReader",
    "CheckpointError",
    "GGUFExportError",
    "GGUFExportReport",
    "GGUF_ARCHITECTURES",
    "GGUF_TYPES",
    "default_arch",
    "export_gguf",
    "load_gguf",
    "model_from_gguf",
    "verify_gguf",
]
