"""Quality of BitNet b1.58 QAT vs full precision: same architecture, same token budget, each at its best LR.

    python benchmarks/bench_quality.py                       # ~2.6M parameters, 200 steps x 16 x 128 tokens
    python benchmarks/bench_quality.py --steps 1000 --hidden 384 --layers 6 --lrs 1e-3 3e-3 6e-3

Both models are the BitNet b1.58 architecture (SubLN norms, squared-ReLU GLU, RoPE, GQA, tied embeddings)
built from one config and one seed: ``bitnet_torch.BitNetForCausalLM`` (BitLinear projections: ternary
weights, int8 activations) and Transformers' ``BitNetForCausalLM`` without a quantizer (``nn.Linear``
projections). Data: the embedded King James Bible, byte-level BPE tokenizer, every 20th chapter held out.
Each variant is trained with AdamW β=(0.9, 0.95) for the same number of steps and tokens at every LR of
``--lrs``: BitLinear with the paper's two-stage schedule (weight decay 0.1 then 0), nn.Linear with warm-up +
cosine decay and weight decay 0.1 (the usual full-precision recipe). The best LR of each (lowest validation
perplexity) is reported, with the ratio BitNet / full precision. The BitNet papers find the gap closes with
scale (parity around 3B parameters); at a few million parameters expect a clear gap.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from transformers import get_cosine_schedule_with_warmup

from bitnet_torch.data import load_text_splits, pack_documents, pack_token_stream, tokenize_documents, train_bpe_tokenizer
from bitnet_torch.data.baseline import unigram_perplexity
from bitnet_torch.training import (
    TwoStageSchedule,
    apply_weight_decay,
    build_adamw,
    build_two_stage_scheduler,
    evaluate_perplexity,
)


def build(variant: str, config_kwargs: dict, seed: int):
    import transformers

    from bitnet_torch.models import BitNetConfig, BitNetForCausalLM

    torch.manual_seed(seed)
    if variant == "bitlinear":
        return BitNetForCausalLM(BitNetConfig(**config_kwargs))
    model = transformers.BitNetForCausalLM(transformers.BitNetConfig(**config_kwargs))
    assert not any(type(m).__name__ == "AutoBitLinear" for m in model.modules())
    return model


def train_one(variant: str, lr: float, config_kwargs: dict, train_blocks, val_blocks, args) -> tuple[float, float]:
    model = build(variant, config_kwargs, args.seed)
    model.train()
    optimizer = build_adamw(model, lr=lr, weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    if variant == "bitlinear":
        schedule = TwoStageSchedule(total_steps=args.steps, warmup_steps=warmup)
        scheduler = build_two_stage_scheduler(optimizer, schedule)
    else:
        schedule = None
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, args.steps)
    order = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(args.seed))
    start = time.perf_counter()
    for step in range(args.steps):
        index = order[(torch.arange(args.batch_size) + step * args.batch_size) % len(order)]
        ids = train_blocks[index.tolist()]["input_ids"]
        if schedule is not None:
            apply_weight_decay(optimizer, schedule, step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    return evaluate_perplexity(model, val_blocks, batch_size=32, max_blocks=args.eval_blocks), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 6e-3])
    parser.add_argument("--eval-blocks", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    splits = load_text_splits()
    tokenizer = train_bpe_tokenizer(splits.train, vocab_size=args.vocab)
    stream = tokenize_documents(tokenizer, splits.train)
    train_blocks = pack_token_stream(stream, args.block_size)
    val_blocks = pack_documents(tokenizer, splits.validation, args.block_size)
    eval_count = min(args.eval_blocks, len(val_blocks))
    baseline = unigram_perplexity(stream, val_blocks[:eval_count]["input_ids"][:, 1:], len(tokenizer))
    config_kwargs = dict(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=args.block_size,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    params = sum(p.numel() for p in build("bitlinear", config_kwargs, 0).parameters())
    tokens = args.steps * args.batch_size * args.block_size
    print(f"model: {params / 1e6:.2f}M parameters (hidden {args.hidden}, {args.layers} layers, vocab {len(tokenizer)}); "
          f"{args.steps} steps x {args.batch_size} x {args.block_size} = {tokens:,} training tokens "
          f"({tokens / stream.numel():.2f} epochs); validation: {eval_count * (args.block_size - 1):,} tokens; "
          f"unigram perplexity {baseline:.1f}; {args.threads} threads")
    best: dict[str, tuple[float, float]] = {}
    for variant in ("bitlinear", "nn.Linear"):
        for lr in args.lrs:
            ppl, seconds = train_one(variant, lr, config_kwargs, train_blocks, val_blocks, args)
            print(f"{variant:>10} lr {lr:.1e}: validation perplexity {ppl:8.2f}  ({seconds:.0f} s)", flush=True)
            if not math.isfinite(ppl):
                continue
            if variant not in best or ppl < best[variant][1]:
                best[variant] = (lr, ppl)
    for variant, (lr, ppl) in best.items():
        print(f"best {variant:>10}: lr {lr:.1e}, validation perplexity {ppl:.2f}")
    if len(best) == 2:
        print(f"ratio BitNet / full precision perplexity: {best['bitlinear'][1] / best['nn.Linear'][1]:.3f} "
              f"at {params / 1e6:.2f}M parameters and {tokens:,} tokens")


if __name__ == "__main__":
    main()
