"""Exports of BitNet checkpoints to other runtimes: GGUF for llama.cpp (TQ1_0/TQ2_0) and bitnet.cpp (I2_S).

* :func:`export_gguf` — checkpoint directory → one ``.gguf`` file (verified bit-exactly on the way out);
* :func:`load_gguf` — ``.gguf`` → ``(config, state_dict)`` in the packed checkpoint layout;
* :func:`model_from_gguf` — ``.gguf`` → ``BitNetForCausalLM`` (the ``from_gguf`` hook).
"""

from __future__ import annotations

from .checkpoint import CheckpointError
from .gguf import (
    GGUF_ARCHITECTURES,
    GGUF_TYPES,
    BitNetGGUFReader,
    GGUFExportError,
    GGUFExportReport,
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
    "export_gguf",
    "load_gguf",
    "model_from_gguf",
    "verify_gguf",
]
