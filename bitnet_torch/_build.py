"""Finds or JIT-compiles the bitnet C++/CUDA extension (being written: see issue 3)."""

from __future__ import annotations


def load_extension() -> str | None:
    """Load the compiled extension; return None on success or the reason it is unavailable."""
    return "the compiled kernels are not part of this build yet"
