"""Hand memory the process has freed back to the operating system.

Packing a model (float weights -> two-bit codes) and quantizing its head and embedding free gigabytes of
temporary tensors. glibc's allocator keeps much of that in its heap (the blocks below its adaptive mmap
threshold, which grows after the first large frees) and so in the process's resident set, where it looks like
memory the model uses. :func:`release_freed_memory` asks glibc to return it (``malloc_trim``); elsewhere (musl,
macOS, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys

logger = logging.getLogger(__name__)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return the allocator's free heap pages to the OS; True if anything was released."""
    trim = _malloc_trim()
    if trim is None:
        return False
    released = bool(trim(0))
    logger.debug("malloc_trim released memory: %s", released)
    return released
