"""Train a small BitNet b1.58 language model from scratch on the King James Bible, on CPU, in minutes.

    python examples/train_from_scratch.py                      # ~4M-parameter model, 6-minute training budget
    python examples/train_from_scratch.py --preset 15m --minutes 30 --output-dir runs/kjv-15m
    python examples/train_from_scratch.py --data my_texts/ --vocab-size 8192   # your own .txt files
    torchrun --nproc_per_node 2 examples/train_from_scratch.py --max-steps 200  # DDP (gloo on CPU, nccl on GPUs)
    accelerate launch --multi_gpu --num_processes 8 examples/train_from_scratch.py --preset 100m --data <dataset>

What happens (all of it is ``bitnet_torch.training.train_from_scratch``, also ``bitnet-torch train``):
1. the corpus is split deterministically (every 20th KJV chapter is validation) and a byte-level BPE
   tokenizer is trained on the training split (seconds);
2. the text is packed into blocks and the unigram perplexity of the validation split is computed: the
   score of a model that ignores context, which ours must beat clearly;
3. a ``bitnet_torch.BitNetForCausalLM`` (BitLinear projections, float master weights) is trained with the
   Transformers ``Trainer`` and the BitNet recipe: AdamW β=(0.9, 0.95), warm-up, LR dropping sharply at
   half-time, weight decay 0.1 then 0. Loss is logged every few steps, validation perplexity periodically;
4. the master (float) and packed (2-bit) checkpoints are written, the packed one is reloaded with
   ``transformers.AutoModelForCausalLM.from_pretrained`` and generates a sample.

Multi-GPU: the same script under ``torchrun``/``accelerate launch`` runs DDP (the ``Trainer`` reads the
launcher's environment; gloo on CPU, nccl on GPUs); ``--batch-size`` is per process, rank 0 writes the
checkpoints and every rank ends with identical weights (tested with 2 CPU processes). FSDP: BitLinear
trains under torch's FSDP2 (``torch.distributed.fsdp.fully_shard`` per decoder layer; tested on CPU/gloo).
Through the ``Trainer`` pass ``TrainConfig.extra_training_args={"fsdp": "full_shard auto_wrap",
"fsdp_config": {"transformer_layer_cls_to_wrap": ["BitNetDecoderLayer"]}}`` or an accelerate FSDP config on
GPUs; on CPU the Trainer ignored those arguments and trained with DDP (``TrainResult.engine`` says which).
"""

from __future__ import annotations

import argparse
import logging

from bitnet_torch.training import PRESETS, TrainConfig, train_from_scratch


def parse_args() -> TrainConfig:
    defaults = TrainConfig(minutes=6.0, max_steps=1000)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=defaults.preset, choices=list(PRESETS), help="model size")
    parser.add_argument("--data", nargs="*", default=None, help="text files/dirs, a saved datasets dir or a datasets name (default: KJV)")
    parser.add_argument("--text-column", default=defaults.text_column)
    parser.add_argument("--tokenizer", default=None, help="reuse a saved tokenizer instead of training one")
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    parser.add_argument("--block-size", type=int, default=defaults.block_size)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per process")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=defaults.gradient_accumulation_steps)
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps)
    parser.add_argument("--minutes", type=float, default=defaults.minutes, help="training time budget; 0 = use --max-steps only")
    parser.add_argument("--lr", type=float, default=defaults.learning_rate, help="peak learning rate")
    parser.add_argument("--eval-steps", type=int, default=defaults.eval_steps)
    parser.add_argument("--output-dir", default=defaults.output_dir)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--no-tqdm", action="store_true")
    a = parser.parse_args()
    return TrainConfig(
        output_dir=a.output_dir,
        data=a.data or None,
        text_column=a.text_column,
        tokenizer=a.tokenizer,
        vocab_size=a.vocab_size,
        preset=a.preset,
        block_size=a.block_size,
        batch_size=a.batch_size,
        gradient_accumulation_steps=a.gradient_accumulation_steps,
        max_steps=a.max_steps,
        minutes=a.minutes or None,
        learning_rate=a.lr,
        eval_steps=a.eval_steps,
        seed=a.seed,
        num_threads=a.threads,
        bf16=a.bf16,
        disable_tqdm=a.no_tqdm,
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    result = train_from_scratch(parse_args())
    print(f"\nrank checksum {result.parameter_checksum[:16]} (world size {result.world_size})")
    if result.packed_dir is None and result.master_dir is None:
        return  # not rank 0
    print(f"model: {result.num_parameters / 1e6:.2f}M parameters, {result.steps} steps, {result.tokens_seen:,} tokens")
    print(f"training time: {result.train_seconds:.0f} s; whole job: {result.total_seconds:.0f} s")
    print(f"final training loss: {result.final_train_loss:.3f}")
    print(
        f"validation perplexity: {result.validation_perplexity:.2f}  (unigram baseline {result.unigram_perplexity:.1f}, "
        f"{result.unigram_perplexity / result.validation_perplexity:.1f}x lower)"
    )
    print(f"saved: {result.master_dir} (master), {result.packed_dir} (packed); the reloaded packed model scores "
          f"perplexity {result.reloaded_subset_perplexity:.2f} on the periodic-evaluation blocks")
    print(f"sample from the reloaded packed model: {result.sample!r}")


if __name__ == "__main__":
    main()
