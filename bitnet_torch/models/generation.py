"""Compiled decoding for ``generate()``: a static KV cache and a ``torch.compile``'d decode step, on CPU too.

Eager decoding spends a large part of each token in Python and in small framework ops between the kernels
(on BitNet 2B-4T with 2 CPU threads: about a quarter of the time). Transformers can compile the decode step
of ``generate()`` when the cache has static shapes, but only on accelerators unless told otherwise;
:func:`compiled_decode_kwargs` returns the ``generate()`` keyword arguments that do it everywhere::

    out = model.generate(**inputs, max_new_tokens=256,
                         **compiled_decode_kwargs(model, inputs["input_ids"], max_new_tokens=256))

The first call compiles (about a minute for the 2B-4T shape on 2 cores; Inductor caches the result on disk, so
later processes start faster). The cache length is rounded up to a multiple of ``bucket`` so that prompts of
similar length reuse one compiled graph. Outputs are those of eager decoding (the same kernels run).
"""

from __future__ import annotations

import torch
from transformers import CompileConfig, StaticCache

__all__ = ["compiled_decode_kwargs", "decode_compile_config", "static_cache_length"]


def decode_compile_config() -> CompileConfig:
    """``CompileConfig`` for the decode step: one graph (``fullgraph``), static shapes, on every device type."""
    config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    # Transformers compiles generate() only on accelerators unless this flag is set.
    config._compile_all_devices = True
    return config


def static_cache_length(needed: int, bucket: int = 256) -> int:
    """``needed`` rounded up to a multiple of ``bucket`` (positions of the static KV cache)."""
    if needed < 1 or bucket < 1:
        raise ValueError(f"needed ({needed}) and bucket ({bucket}) must be positive")
    return -(-needed // bucket) * bucket


def compiled_decode_kwargs(
    model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, bucket: int = 256
) -> dict:
    """``generate()`` keyword arguments for a static KV cache and a compiled decode step.

    Args:
        model: the causal LM (its config sizes the cache).
        input_ids: the prompt ``[batch, length]`` (sets the batch size and the cache length).
        max_new_tokens: the most tokens this ``generate()`` call will add.
        bucket: the cache length is ``prompt + max_new_tokens`` rounded up to a multiple of this.

    Returns ``{"cache": StaticCache, "compile_config": CompileConfig}``. Use a fresh dict per call: the cache
    holds that call's keys and values.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    length = static_cache_length(input_ids.shape[1] + max_new_tokens, bucket)
    cache = StaticCache(config=model.config, max_cache_len=length)
    return {"cache": cache, "compile_config": decode_compile_config()}
