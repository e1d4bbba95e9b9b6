"""Validation perplexity of a causal LM on packed blocks (token-weighted, exact over the blocks given)."""

from __future__ import annotations

import math

import datasets
import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["evaluate_perplexity"]


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module,
    blocks: datasets.Dataset,
    batch_size: int = 16,
    max_blocks: int | None = None,
    progress: bool = False,
) -> float:
    """``exp`` of the mean next-token cross-entropy over every scored position of ``blocks``.

    ``blocks`` holds equal-length ``input_ids`` (from :func:`bitnet_torch.data.pack_documents`); every
    position but the first of each block is scored once (the first ``max_blocks`` blocks only, when given;
    :func:`bitnet_torch.training.from_scratch.evaluation_subset` picks a bounded subset spread over a split). The model is
    put in eval mode and restored; ``progress`` shows a tqdm bar. Raises ``ValueError`` for an empty dataset.
    """
    count = len(blocks) if max_blocks is None else min(len(blocks), max_blocks)
    if count == 0:
        raise ValueError("no validation blocks to evaluate")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_targets = 0
    try:
        starts = range(0, count, batch_size)
        for start in tqdm(starts, desc="validation", unit="batch", disable=not progress, leave=False):
            ids = torch.as_tensor(blocks[start : min(start + batch_size, count)]["input_ids"]).to(device)
            loss = model(input_ids=ids, labels=ids).loss
            targets = ids.shape[0] * (ids.shape[1] - 1)
            total_nll += float(loss) * targets
            total_targets += targets
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_targets)
