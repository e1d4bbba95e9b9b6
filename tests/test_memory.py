"""``release_freed_memory``: freed heap pages really leave the resident set (glibc only)."""

from __future__ import annotations

import ctypes
import sys

import pytest

from bitnet_torch._memory import _malloc_trim, release_freed_memory

pytestmark = pytest.mark.skipif(_malloc_trim() is None, reason="the C library has no malloc_trim (not glibc)")


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_freed_heap_blocks_are_returned_to_the_os():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block = 64 * 1024  # below glibc's mmap threshold: these come from the heap, as many small tensors do
    blocks = []
    for _ in range(3200):  # ~200 MB
        p = libc.malloc(block)
        assert p
        ctypes.memset(p, 1, block)  # touch every page
        blocks.append(p)
    keep = libc.malloc(block)  # a live block above the freed ones: free() alone cannot shrink the heap
    ctypes.memset(keep, 1, block)
    for p in blocks:
        libc.free(p)
    before = _rss_bytes()
    assert release_freed_memory() is True
    after = _rss_bytes()
    libc.free(keep)
    assert before - after > 100 * 1024 * 1024, f"resident set {before / 1e6:.0f} -> {after / 1e6:.0f} MB"


def test_is_a_no_op_where_there_is_no_glibc(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    _malloc_trim.cache_clear()
    try:
        assert release_freed_memory() is False
    finally:
        _malloc_trim.cache_clear()
