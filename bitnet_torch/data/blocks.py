"""Tokenize documents and pack them into fixed-length blocks for causal-LM training.

Each document is followed by the EOS token, the token streams are concatenated, and the stream is cut
into non-overlapping blocks of ``block_size`` tokens (the incomplete tail is dropped). The result is a
``datasets.Dataset`` with ``input_ids`` and ``labels`` (equal; the model shifts them), ready for the
Transformers ``Trainer`` with ``default_data_collator``.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import torch
from transformers import PreTrainedTokenizerBase

__all__ = ["tokenize_documents", "pack_token_stream", "pack_documents"]


def tokenize_documents(tokenizer: PreTrainedTokenizerBase, documents: Sequence[str]) -> torch.Tensor:
    """One int64 stream: every document's ids followed by EOS (no BOS, no truncation)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; packing needs it to separate documents")
    encodings = tokenizer.backend_tokenizer.encode_batch(list(documents), add_special_tokens=False)
    stream: list[int] = []
    for encoding in encodings:
        stream.extend(encoding.ids)
        stream.append(tokenizer.eos_token_id)
    return torch.tensor(stream, dtype=torch.long)


def pack_token_stream(stream: torch.Tensor, block_size: int) -> datasets.Dataset:
    """Cut a 1-D token stream into ``len(stream) // block_size`` blocks; refuses streams shorter than a block."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    num_blocks = stream.numel() // block_size
    if num_blocks == 0:
        raise ValueError(f"only {stream.numel()} tokens: not enough for one block of {block_size}")
    blocks = stream[: num_blocks * block_size].reshape(num_blocks, block_size).tolist()
    dataset = datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    return dataset.with_format("torch")


def pack_documents(tokenizer: PreTrainedTokenizerBase, documents: Sequence[str], block_size: int) -> datasets.Dataset:
    """:func:`tokenize_documents` then :func:`pack_token_stream`."""
    return pack_token_stream(tokenize_documents(tokenizer, documents), block_size)
