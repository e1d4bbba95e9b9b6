"""Training runs end to end on tiny models: Trainer + recipe, train_from_scratch, trl LoRA fine-tuning."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

from bitnet_torch.data import pack_token_stream
from bitnet_torch.models import BitNetConfig, BitNetForCausalLM
from bitnet_torch.training import (
    FinetuneConfig,
    TrainConfig,
    TwoStageSchedule,
    WeightDecayScheduleCallback,
    build_adamw,
    build_two_stage_scheduler,
    finetune_lora,
    train_from_scratch,
)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _corpus(tmp_path):
    verses = [
        "In the beginning God created the heaven and the earth.",
        "And the earth was without form, and void; and darkness was upon the face of the deep.",
        "And God said, Let there be light: and there was light.",
        "And God saw the light, that it was good: and God divided the light from the darkness.",
    ]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(verses[i % 4] + f" Verse {i}." for i in range(80)))
    return path


def test_a_few_trainer_steps_with_the_recipe_reduce_loss(tmp_path):
    torch.manual_seed(0)
    model = BitNetForCausalLM(BitNetConfig(vocab_size=64, max_position_embeddings=32, tie_word_embeddings=True,
                                           bos_token_id=0, eos_token_id=1, **TINY))
    blocks = pack_token_stream(torch.arange(16 * 32) % 61 + 2, block_size=32)  # a learnable repeating pattern
    optimizer = build_adamw(model, lr=1e-2)
    assert [len(g["params"]) for g in optimizer.param_groups] == [14, 1 + 2 * 4 + 1], "decayed / not decayed"
    schedule = TwoStageSchedule(total_steps=16, warmup_steps=2)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), max_steps=16, per_device_train_batch_size=4, logging_steps=1,
                               report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True),
        train_dataset=blocks,
        data_collator=default_data_collator,
        optimizers=(optimizer, build_two_stage_scheduler(optimizer, schedule)),
        callbacks=[WeightDecayScheduleCallback(schedule)],
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert losses[-1] < 0.85 * losses[0], losses
    assert lrs[7] > 2 * lrs[8], f"no sharp LR drop at the stage boundary: {lrs}"
    assert optimizer.param_groups[0]["weight_decay"] == 0.0 and optimizer.param_groups[1]["weight_decay"] == 0.0


def test_train_from_scratch_end_to_end_saves_and_reloads(tmp_path):
    result = train_from_scratch(TrainConfig(
        output_dir=str(tmp_path / "run"), data=str(_corpus(tmp_path)), vocab_size=300, preset="5m",
        model_overrides=TINY, block_size=32, batch_size=8, max_steps=40, eval_steps=20, eval_tokens=4 * 31,
        learning_rate=1e-2, logging_steps=5, disable_tqdm=True, sample_tokens=8, extra_training_args={"use_cpu": True},
    ))
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    assert any("eval_perplexity" in h for h in result.log_history)
    assert result.validation_perplexity < result.unigram_perplexity, "40 steps on a repetitive corpus must beat unigram"
    for directory, mode in ((result.master_dir, "online"), (result.packed_dir, "offline")):
        config = json.loads((tmp_path / "run" / directory.rsplit("/", 1)[-1] / "config.json").read_text())
        assert config["quantization_config"]["quantization_mode"] == mode
    packed = AutoModelForCausalLM.from_pretrained(result.packed_dir)
    assert packed.config.quantization_config["quantization_mode"] == "offline"
    last_eval = [h["eval_perplexity"] for h in result.log_history if "eval_perplexity" in h][-1]
    assert result.reloaded_subset_perplexity == pytest.approx(last_eval, rel=1e-4), "packed reload changed the model"
    assert isinstance(result.sample, str) and result.sample


@pytest.mark.slow
def test_finetune_lora_with_trl_master_and_packed_bases(tmp_path):
    base = train_from_scratch(TrainConfig(
        output_dir=str(tmp_path / "base"), data=str(_corpus(tmp_path)), vocab_size=300, preset="5m",
        model_overrides=TINY, block_size=32, batch_size=4, max_steps=2, eval_steps=0, disable_tqdm=True,
        save_packed=False, sample_tokens=2, extra_training_args={"use_cpu": True},
    ))
    common = dict(model=base.master_dir, num_examples=16, max_steps=8, batch_size=8, max_length=64, learning_rate=1e-2,
                  logging_steps=1, disable_tqdm=True, sample_tokens=4, extra_sft_args={"use_cpu": True})
    merged = finetune_lora(FinetuneConfig(output_dir=str(tmp_path / "m"), base="master", merge=True, **common))
    assert merged.final_loss < merged.first_loss
    assert merged.trainable_parameters < 0.5 * merged.total_parameters
    assert (tmp_path / "m" / "adapter" / "adapter_model.safetensors").is_file()
    for directory, mode in ((merged.merged_master_dir, "online"), (merged.merged_packed_dir, "offline")):
        assert AutoModelForCausalLM.from_pretrained(directory).config.quantization_config["quantization_mode"] == mode
    assert merged.merged_max_abs_logit_diff is not None and merged.base_max_abs_logit_diff > 0

    packed = finetune_lora(FinetuneConfig(output_dir=str(tmp_path / "p"), base="packed", merge=False, **common))
    assert packed.final_loss < packed.first_loss
    assert packed.adapter_reload_exact is True
    with pytest.raises(ValueError, match="packed base"):
        finetune_lora(FinetuneConfig(output_dir=str(tmp_path / "x"), base="packed", merge=True, **common))


def test_a_small_time_budget_makes_the_model_shallower_and_the_batch_smaller(tmp_path):
    """With --minutes on a machine too slow for the budget: fewer layers (>= 2), smaller batches, a bounded run."""
    result = train_from_scratch(TrainConfig(
        output_dir=str(tmp_path / "run"), data=str(_corpus(tmp_path)), vocab_size=300, preset="5m",
        model_overrides={**TINY, "num_hidden_layers": 8}, block_size=32, batch_size=8, min_batch_size=2,
        minutes=0.1, min_steps=10**6, full_depth_tokens=10**12, eval_tokens=2 * 31, disable_tqdm=True,
        save_steps=0, save_master=False, sample_tokens=2, extra_training_args={"use_cpu": True},
    ))
    assert result.num_hidden_layers == 2, "8 layers halve to 4, then to 2, and stop there"
    assert result.batch_size == 2
    job = json.loads((tmp_path / "run" / "train_job.json").read_text())
    assert job["model_overrides"]["num_hidden_layers"] == 2 and job["batch_size"] == 2
    assert AutoModelForCausalLM.from_pretrained(result.packed_dir).config.num_hidden_layers == 2
    assert result.steps <= result.planned_steps
    assert any("loss" in h for h in result.log_history), "no loss line in a short run"


def test_the_time_budget_says_when_it_cuts_training_short(caplog):
    import logging
    import time

    from transformers import TrainerControl, TrainerState

    from bitnet_torch.training import TimeBudgetCallback

    callback = TimeBudgetCallback(0.01)
    callback.on_train_begin(None, TrainerState(), TrainerControl())
    time.sleep(0.02)
    control = TrainerControl()
    with caplog.at_level(logging.WARNING, logger="bitnet_torch"):
        callback.on_step_end(None, TrainerState(global_step=3, max_steps=10), control)
    assert control.should_training_stop
    assert "time budget reached (0 s) at step 3 of 10" in caplog.text


def test_the_evaluation_subset_is_bounded_and_spread_over_the_split():
    from bitnet_torch.training.from_scratch import evaluation_subset

    blocks = pack_token_stream(torch.arange(100 * 16) % 50, block_size=16)  # 100 blocks; block i starts at 16 i
    subset = evaluation_subset(blocks, max_tokens=10 * 16)
    assert len(subset) == 10
    starts = [int(row[0]) for row in subset["input_ids"]]
    assert starts == [(16 * 10 * i) % 50 for i in range(10)], "every 10th block, from the first to the last tenth"
    assert len(evaluation_subset(blocks, max_tokens=10**9)) == 100
    assert len(evaluation_subset(blocks, max_tokens=1)) == 1
