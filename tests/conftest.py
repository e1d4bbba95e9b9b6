"""Shared test set-up: deterministic seeds and quiet, offline Hugging Face libraries."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


#: Every CPU instruction set the kernels dispatch to (``BITNET_TORCH_CPU_ISA``).
ALL_ISAS = ("scalar", "avx2", "avx512", "amx")


@pytest.fixture(params=ALL_ISAS)
def isa(request):
    """Force one instruction set of the compiled kernels for the test, restore the automatic choice afterwards;
    skipped without the extension or when this CPU lacks the instruction set."""
    from bitnet_torch import _backend, ops

    if not ops.extension_loaded():
        pytest.skip(f"compiled kernels unavailable: {ops.extension_error()}")
    if request.param not in _backend.available_cpu_isas():
        pytest.skip(f"this CPU does not support {request.param}")
    assert _backend.set_cpu_isa(request.param) == request.param
    yield request.param
    _backend.set_cpu_isa("auto")
