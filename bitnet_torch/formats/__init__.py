"""File formats the models read, below ``models`` in the layering (``export`` writes them, above).

* :mod:`.ternary` — byte layouts of ternary matrices in GGUF (I2_S, TQ1_0, TQ2_0): packers and decoders;
* :mod:`.gguf_layout` — BitNet GGUF tensor names, metadata keys, architectures and what each runtime runs;
* :mod:`.gguf_reader` — :func:`load_gguf` / :func:`model_from_gguf` and :class:`BitNetGGUFReader` (reads I2_S,
  which the stock ``gguf`` reader cannot);
* :mod:`.gguf_tokenizer` — a Transformers tokenizer rebuilt from a GGUF's tokenizer metadata.
"""

from __future__ import annotations

from typing import Any

from .gguf_layout import GGUF_ARCHITECTURES, GGUF_TYPES, GGUFError

__all__ = ["BitNetGGUFReader", "GGUFError", "GGUF_ARCHITECTURES", "GGUF_TYPES", "load_gguf", "model_from_gguf"]

_READER_NAMES = ("BitNetGGUFReader", "load_gguf", "model_from_gguf")


def __getattr__(name: str) -> Any:
    """The reader (which imports torch) is loaded on first use, so the CLI's ``--help`` stays light."""
    if name in _READER_NAMES:
        from . import gguf_reader

        return getattr(gguf_reader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
