"""SiLU-FFN BitNet models (1bitLLM style) in the model, training and conversion, and presets whose every
projection row exports to every GGUF type (issue 14, section 3)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from bitnet_torch import BitNetConfig, BitNetForCausalLM
from bitnet_torch.export import export_gguf
from bitnet_torch.training import PRESETS, count_parameters
from bitnet_torch.training.from_scratch import build_model_from_preset
from test_gguf_helpers import save_tiny_tokenizer

TINY = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2)


@pytest.mark.parametrize("act,fn", [("silu", F.silu), ("relu2", lambda t: F.relu(t) ** 2)])
def test_mlp_applies_the_configured_activation(act, fn):
    torch.manual_seed(0)
    model = BitNetForCausalLM(BitNetConfig(**TINY, hidden_act=act)).eval()
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        expected = mlp.down_proj(mlp.ffn_sub_norm(fn(mlp.gate_proj(x)) * mlp.up_proj(x)))
        assert torch.equal(mlp(x), expected)
        packed = BitNetForCausalLM.from_config(model.config, packed=True).eval()
        packed_mlp = packed.model.layers[0].mlp
        assert torch.allclose(packed_mlp(x), packed_mlp.down_proj(
            packed_mlp.ffn_sub_norm(fn(packed_mlp.gate_proj(x)) * packed_mlp.up_proj(x))), atol=1e-5)


def test_config_refuses_an_unknown_activation():
    with pytest.raises(ValueError, match="hidden_act='swiglu_typo'.*'relu2'.*'silu'"):
        BitNetConfig(**TINY, hidden_act="swiglu_typo")


def test_silu_survives_save_and_reload(tmp_path):
    model = BitNetForCausalLM(BitNetConfig(**TINY, hidden_act="silu"))
    model.save_pretrained(tmp_path / "m", packed=True)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["hidden_act"] == "silu"
    assert BitNetForCausalLM.from_pretrained(tmp_path / "m").config.hidden_act == "silu"


def test_training_builds_a_silu_model_when_asked(tmp_path):
    tokenizer = save_tiny_tokenizer(tmp_path / "tok")
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2)
    assert build_model_from_preset("5m", tokenizer, **small).config.hidden_act == "relu2"
    model = build_model_from_preset("5m", tokenizer, hidden_act="silu", **small)
    assert model.config.hidden_act == "silu"
    from bitnet_torch.training import TrainConfig

    assert TrainConfig(hidden_act="silu").hidden_act == "silu"


def test_conversion_keeps_a_llamas_silu_or_switches_to_relu2_when_asked():
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitnet_torch.models import convert_llama_to_bitnet

    def llama():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**TINY, max_position_embeddings=64))

    assert convert_llama_to_bitnet(llama()).config.hidden_act == "silu"
    relu2 = convert_llama_to_bitnet(llama(), hidden_act="relu2")
    assert relu2.config.hidden_act == "relu2"
    assert relu2.model.layers[0].mlp.act_fn(torch.tensor([-1.0, 2.0])).tolist() == [0.0, 4.0]


def test_every_preset_has_projection_rows_that_fill_gguf_blocks():
    for name, preset in PRESETS.items():
        assert preset.hidden_size % 256 == 0 and preset.intermediate_size % 256 == 0, name
        assert preset.hidden_size % preset.num_attention_heads == 0, name


def test_preset_parameter_counts_stay_close_to_what_they_were():
    before = {"5m": 3.954624e6, "15m": 14.173568e6, "100m": 100.126464e6, "300m": 303.442944e6,
              "650m": 643.905024e6, "1.1b": 1129.073664e6, "2b": 2412.82048e6}
    for name, count in before.items():
        vocab = 4096 if name in ("5m", "15m") else 32000
        assert count_parameters(PRESETS[name], vocab) == pytest.approx(count, rel=0.02), name


@pytest.mark.slow
def test_the_default_preset_exports_to_every_type_without_f16_fallback(tmp_path):
    tokenizer = save_tiny_tokenizer(tmp_path / "m")
    model = build_model_from_preset("5m", tokenizer)
    model.save_pretrained(tmp_path / "m", packed=True)
    for gguf_type in ("i2_s", "tq2_0", "tq1_0", "f16"):
        report = export_gguf(tmp_path / "m", tmp_path / f"{gguf_type}.gguf", gguf_type, verify=False)
        assert report.fallbacks == [], report.fallbacks
        assert report.tensor_types[gguf_type] >= 7 * PRESETS["5m"].num_hidden_layers
