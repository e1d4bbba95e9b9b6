"""The two-stage LR / weight-decay schedule, the AdamW builder, and the λ warm-up callback (SPEC §2)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import TrainerControl, TrainerState, TrainingArguments

import bitnet_torch
from bitnet_torch.training import (
    DECAY_GROUP_KEY,
    LambdaWarmupCallback,
    TwoStageSchedule,
    WeightDecayScheduleCallback,
    apply_weight_decay,
    build_adamw,
    build_two_stage_scheduler,
    count_parameters,
    get_preset,
    split_decay_parameters,
)


def test_two_stage_schedule_values_at_given_steps():
    s = TwoStageSchedule(total_steps=100, warmup_steps=4, boundary_fraction=0.5, stage1_end_ratio=0.8,
                         stage2_peak_ratio=0.3, final_ratio=0.0)
    assert s.boundary_step == 50
    # linear warm-up (step + 1) / (warmup + 1)
    assert [s(i) for i in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert s(4) == pytest.approx(1.0)  # peak right after warm-up
    assert s(49) == pytest.approx(0.8)  # end of stage 1
    assert s(27) == pytest.approx(1.0 + (0.8 - 1.0) * (23 / 45))
    assert s(50) == pytest.approx(0.3)  # the sharp drop
    assert s(99) == pytest.approx(0.0)
    assert s(74) == pytest.approx(0.3 * (1 - 24 / 49))
    assert s(49) - s(50) > 0.4, "the LR must drop sharply at the stage boundary"
    assert all(s(i) >= s(i + 1) for i in range(4, 99)), "LR must not increase after the warm-up"


def test_cosine_decay_endpoints_and_midpoint():
    s = TwoStageSchedule(total_steps=21, warmup_steps=0, boundary_fraction=0.5, stage1_end_ratio=0.5,
                         stage2_peak_ratio=0.2, final_ratio=0.0, decay="cosine")
    b = s.boundary_step  # 10 (round half to even of 10.5)
    assert s(0) == pytest.approx(1.0) and s(b - 1) == pytest.approx(0.5)
    assert s((b - 1) // 2) == pytest.approx(0.5 + 0.25 * (1 + math.cos(math.pi * ((b - 1) // 2) / (b - 1))))
    assert s(b) == pytest.approx(0.2) and s(20) == pytest.approx(0.0)


def test_weight_decay_is_stage_one_only():
    s = TwoStageSchedule(total_steps=10, warmup_steps=1)
    assert [s.weight_decay_at(i) for i in range(10)] == [0.1] * 5 + [0.0] * 5


@pytest.mark.parametrize(
    "kwargs",
    [dict(total_steps=0), dict(total_steps=10, warmup_steps=5), dict(total_steps=10, boundary_fraction=1.0),
     dict(total_steps=10, stage2_peak_ratio=0.9, stage1_end_ratio=0.8), dict(total_steps=10, decay="step")],
)
def test_schedule_refuses_inconsistent_settings(kwargs):
    with pytest.raises(ValueError):
        TwoStageSchedule(**kwargs)


def _tiny_model() -> nn.Module:
    return nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8), bitnet_torch.BitLinear(8, 8), nn.Linear(8, 10))


def test_adamw_groups_exclude_norms_biases_embeddings():
    model = _tiny_model()
    decayed, not_decayed = split_decay_parameters(model)
    assert {id(p) for p in decayed} == {id(model[2].weight), id(model[3].weight)}
    assert {id(p) for p in not_decayed} == {id(model[0].weight), id(model[1].weight), id(model[1].bias),
                                           id(model[2].bias), id(model[3].bias)}
    opt = build_adamw(model, lr=1e-3)
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_scheduler_and_weight_decay_switch_in_a_plain_loop():
    model = _tiny_model()
    opt = build_adamw(model, lr=2e-3)
    schedule = TwoStageSchedule(total_steps=8, warmup_steps=1)
    scheduler = build_two_stage_scheduler(opt, schedule)
    seen = []
    for step in range(8):
        wd = apply_weight_decay(opt, schedule, step)
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"], opt.param_groups[1]["weight_decay"]))
        assert wd == opt.param_groups[0]["weight_decay"]
        opt.step()
        scheduler.step()
    assert [lr for lr, _, _ in seen] == pytest.approx([2e-3 * schedule(i) for i in range(8)])
    assert [wd for _, wd, _ in seen] == [0.1] * 4 + [0.0] * 4
    assert all(wd == 0.0 for _, _, wd in seen), "the no-decay group must never get weight decay"


def test_apply_weight_decay_tags_foreign_optimizers():
    model = _tiny_model()
    opt = torch.optim.AdamW([{"params": [model[2].weight], "weight_decay": 0.05}, {"params": [model[2].bias], "weight_decay": 0.0}])
    apply_weight_decay(opt, TwoStageSchedule(total_steps=4), 3)
    assert [g[DECAY_GROUP_KEY] for g in opt.param_groups] == [True, False]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]


def test_weight_decay_callback_switches_at_boundary(tmp_path):
    model = _tiny_model()
    opt = build_adamw(model, lr=1e-3)
    callback = WeightDecayScheduleCallback(TwoStageSchedule(total_steps=10, warmup_steps=1))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    state = TrainerState()
    for step, expected in [(0, 0.1), (4, 0.1), (5, 0.0), (9, 0.0)]:
        state.global_step = step
        callback.on_step_begin(args, state, TrainerControl(), optimizer=opt)
        assert opt.param_groups[0]["weight_decay"] == expected, f"step {step}"


def test_lambda_warmup_callback_sets_every_bitlinear(tmp_path):
    model = nn.Sequential(bitnet_torch.BitLinear(8, 8), nn.ReLU(), bitnet_torch.BitLinear(8, 4))
    callback = LambdaWarmupCallback(warmup_steps=4)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    state = TrainerState()
    callback.on_train_begin(args, state, TrainerControl(), model=model)
    assert model[0].lambda_ == 0.0 and model[2].lambda_ == 0.0
    for step, expected in [(1, 0.25), (2, 0.5), (4, 1.0), (7, 1.0)]:
        state.global_step = step
        callback.on_step_begin(args, state, TrainerControl(), model=model)
        assert (model[0].lambda_, model[2].lambda_) == (expected, expected)
    with pytest.raises(ValueError, match="no BitLinear"):
        callback.on_step_begin(args, state, TrainerControl(), model=nn.Linear(2, 2))


def test_presets_span_5m_to_the_2b_4t_shape():
    assert count_parameters(get_preset("5m"), 8192) == pytest.approx(5.0e6, rel=0.02)
    two_b = get_preset("2b")
    assert (two_b.hidden_size, two_b.num_hidden_layers, two_b.num_attention_heads, two_b.num_key_value_heads,
            two_b.intermediate_size, two_b.vocab_size) == (2560, 30, 20, 5, 6912, 128256)
    assert count_parameters(two_b) == pytest.approx(2.41e9, rel=0.01)
    with pytest.raises(ValueError, match="known presets"):
        get_preset("7b")
