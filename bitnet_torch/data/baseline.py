"""The unigram perplexity baseline: what a model that ignores context would score.

A language model is only learning something about context if its validation perplexity is clearly
below ``exp(H)``, where ``H`` is the cross-entropy of the validation tokens under the training-set token
frequencies with add-one (Laplace) smoothing over the whole vocabulary.
"""

from __future__ import annotations

import math

import torch

__all__ = ["unigram_perplexity"]


def unigram_perplexity(train_tokens: torch.Tensor, eval_targets: torch.Tensor, vocab_size: int) -> float:
    """``exp`` of the mean ``-log p(t)`` over ``eval_targets`` with ``p(t) = (count_t + 1) / (N + V)``.

    ``train_tokens`` and ``eval_targets`` are integer tensors of token ids (any shape); the targets
    should be exactly the tokens the model is scored on (for packed blocks: every position but the
    first of each block). Raises ``ValueError`` on ids outside ``[0, vocab_size)`` or empty targets.
    """
    train_tokens = train_tokens.reshape(-1).long()
    eval_targets = eval_targets.reshape(-1).long()
    if eval_targets.numel() == 0:
        raise ValueError("no evaluation targets")
    for name, ids in (("train_tokens", train_tokens), ("eval_targets", eval_targets)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"{name} holds ids outside [0, {vocab_size})")
    counts = torch.bincount(train_tokens, minlength=vocab_size).double() + 1.0
    log_probs = counts.log() - math.log(float(counts.sum()))
    return math.exp(-float(log_probs[eval_targets].mean()))
