"""LoRA fine-tuning of a BitNet model with trl's SFTTrainer on a chat dataset, then merging done right.

    python examples/train_from_scratch.py                                   # writes bitnet-kjv/master
    python examples/finetune_lora_trl.py --model bitnet-kjv/master         # master base, merge + re-quantize
    python examples/finetune_lora_trl.py --model bitnet-kjv/master --base packed   # frozen 2-bit base, separate adapter
    python examples/finetune_lora_trl.py --model bitnet-kjv/master --dataset chats.jsonl  # your own `messages` rows

Which model you get (all of it is ``bitnet_torch.training.finetune_lora``, also ``bitnet-torch finetune``):

* ``--base master`` (default): the projections are BitLinear layers with float master weights, frozen by
  peft; the adapter is trained next to them. With merging (default) ``scaling·B@A`` is added to the master
  weights and the model re-quantizes them: ``<out>/merged-master`` and ``<out>/merged-packed`` are ordinary
  BitNet checkpoints (``quantization_config`` kept). Their outputs equal the unmerged model's only up to the
  change of the ternary codes — the script prints both the adapter's own effect on the logits and how much
  of it the merge changed. ``--no-merge`` keeps only the adapter.
* ``--base packed``: the base is loaded as 2-bit PackedBitLinear layers (a quarter of the memory of int8,
  no float weights) and stays frozen; the adapter lives in float next to it and is never merged. Reload it
  with ``peft.AutoPeftModelForCausalLM.from_pretrained(adapter)`` (after ``import bitnet_torch``; the adapter
  records the base's absolute path) or ``PeftModel.from_pretrained(BitNetForCausalLM.from_pretrained(base,
  packed=True), adapter)``; the script checks that the reloaded logits are bit-identical.

Adapters are saved with peft (``<out>/adapter``: ``adapter_model.safetensors`` + ``adapter_config.json``).
The default dataset is a synthetic question set about the KJV built locally (no hub). Multi-GPU: run under
``accelerate launch`` / ``torchrun`` like any trl script.
"""

from __future__ import annotations

import argparse
import logging

from bitnet_torch.training import FinetuneConfig, finetune_lora


def parse_args() -> FinetuneConfig:
    defaults = FinetuneConfig(model="")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bitnet-kjv/master", help="saved BitNet checkpoint with its tokenizer")
    parser.add_argument("--base", choices=("master", "packed"), default=defaults.base)
    parser.add_argument("--no-merge", action="store_true", help="keep only the adapter (always the case on a packed base)")
    parser.add_argument("--dataset", default=None, help="JSON/JSONL file, saved datasets dir or datasets name with 'messages'")
    parser.add_argument("--num-examples", type=int, default=defaults.num_examples)
    parser.add_argument("--r", type=int, default=defaults.r)
    parser.add_argument("--lora-alpha", type=int, default=defaults.lora_alpha)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate)
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--output-dir", default=defaults.output_dir)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--question", default=defaults.sample_question)
    a = parser.parse_args()
    return FinetuneConfig(
        model=a.model,
        output_dir=a.output_dir,
        base=a.base,
        merge=not a.no_merge and a.base == "master",
        dataset=a.dataset,
        num_examples=a.num_examples,
        r=a.r,
        lora_alpha=a.lora_alpha,
        learning_rate=a.lr,
        max_steps=a.max_steps,
        batch_size=a.batch_size,
        max_length=a.max_length,
        seed=a.seed,
        sample_question=a.question,
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    result = finetune_lora(parse_args())
    print(f"\nLoRA on a {result.base} base: {result.trainable_parameters:,} trainable of {result.total_parameters:,} parameters")
    print(f"{result.steps} steps in {result.train_seconds:.0f} s; loss {result.first_loss:.3f} -> {result.final_loss:.3f}")
    print(f"adapter saved in {result.adapter_dir}")
    if result.merged_master_dir:
        print(f"merged: {result.merged_master_dir} (master), {result.merged_packed_dir} (packed)")
        print(
            f"max |logit| change: adapter on vs off {result.base_max_abs_logit_diff:.4f}; "
            f"merged+re-quantized vs unmerged {result.merged_max_abs_logit_diff:.4f}"
        )
    if result.adapter_reload_exact is not None:
        print(f"adapter reloaded on a fresh packed base gives bit-identical logits: {result.adapter_reload_exact}")
    print(f"answer: {result.sample!r}")


if __name__ == "__main__":
    main()
