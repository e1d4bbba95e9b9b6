"""Transformers' ``from_pretrained`` / ``save_pretrained`` contract on our classes (issue 14, section 2).

The ideas come from Transformers' own modelling test suite (``tests/test_modeling_common.py``): save/load
round trips, loading from ``state_dict=``, missing and unexpected keys reported through
``output_loading_info``, tied weights, loading a base-model checkpoint into the head model and back
(``base_model_prefix``), the ``GenerationMixin`` base and ``num_parameters``. Every model is tiny (hidden 64,
2 layers) and real; nothing of Transformers is mocked.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GenerationMixin

from bitnet_torch.models import BitNetCheckpointError, BitNetForCausalLM, BitNetModel
from bitnet_torch.nn import BitLinear, PackedBitLinear
from test_model import tiny_config

IDS = torch.tensor([[1, 17, 42, 99, 3, 250, 7]])


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _hidden(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).last_hidden_state


@pytest.fixture(scope="module")
def master() -> BitNetForCausalLM:
    torch.manual_seed(99)
    return BitNetForCausalLM(tiny_config()).eval()


@pytest.fixture(scope="module")
def saved(master, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("contract")
    paths = {"master": str(root / "master"), "packed": str(root / "packed")}
    master.save_pretrained(paths["master"], packed=False)
    master.save_pretrained(paths["packed"], packed=True)
    return paths


def _rewrite(src: str, dst, edit) -> str:
    """Copy checkpoint ``src`` to ``dst`` with its tensors passed through ``edit(dict) -> dict``."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name != "model.safetensors":
            with open(os.path.join(src, name), "rb") as f_in, open(os.path.join(dst, name), "wb") as f_out:
                f_out.write(f_in.read())
    tensors = edit(load_file(os.path.join(src, "model.safetensors")))
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


# --- state_dict= ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["master", "packed"])
def test_from_pretrained_none_with_config_and_state_dict(saved, form):
    reference = BitNetForCausalLM.from_pretrained(saved[form])
    state_dict = load_file(os.path.join(saved[form], "model.safetensors"))
    model, info = BitNetForCausalLM.from_pretrained(
        None, config=reference.config, state_dict=state_dict, output_loading_info=True
    )
    assert model.is_packed == (form == "packed")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=0, atol=0)


def test_state_dict_from_a_master_model_packs_while_loading(master, saved):
    model = BitNetForCausalLM.from_pretrained(None, config=master.config, state_dict=master.state_dict(), packed=True)
    assert all(isinstance(m, PackedBitLinear) for _, m in model.model.projections())
    torch.testing.assert_close(_logits(model), _logits(BitNetForCausalLM.from_pretrained(saved["packed"])),
                               rtol=0, atol=0)


def test_state_dict_is_checked_like_files(master, saved):
    state_dict = dict(master.state_dict())
    state_dict["model.layers.0.mlp.up_proj.weight"] = torch.zeros(64, 64)
    with pytest.raises(BitNetCheckpointError, match="up_proj.weight is F32 \\(64, 64\\)"):
        BitNetForCausalLM.from_pretrained(None, config=master.config, state_dict=state_dict)
    with pytest.raises(ValueError, match="not both"):
        BitNetForCausalLM.from_pretrained(saved["master"], state_dict=master.state_dict())
    with pytest.raises(ValueError, match="needs config="):
        BitNetForCausalLM.from_pretrained(None, state_dict=master.state_dict())


# --- round trips ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["master", "packed"])
def test_save_load_save_is_byte_identical(saved, tmp_path, form):
    model = BitNetForCausalLM.from_pretrained(saved[form])
    model.save_pretrained(tmp_path / "again")
    again = BitNetForCausalLM.from_pretrained(tmp_path / "again")
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    with open(os.path.join(saved[form], "model.safetensors"), "rb") as a, open(tmp_path / "again" / "model.safetensors", "rb") as b:
        assert a.read() == b.read(), f"{form}: a load/save round trip changed model.safetensors"
    mine, theirs = again.config.to_dict(), model.config.to_dict()
    mine.pop("_name_or_path"), theirs.pop("_name_or_path")
    assert mine == theirs


# --- missing and unexpected keys --------------------------------------------------------------------------


def test_missing_master_tensors_are_initialised_reported_and_warned(saved, tmp_path, caplog):
    dropped = {"model.layers.1.mlp.up_proj.weight", "model.layers.0.input_layernorm.weight"}
    path = _rewrite(saved["master"], tmp_path / "partial", lambda t: {k: v for k, v in t.items() if k not in dropped})
    with caplog.at_level(logging.WARNING, logger="bitnet_torch"):
        model, info = BitNetForCausalLM.from_pretrained(path, output_loading_info=True)
    assert set(info["missing_keys"]) == dropped
    assert any("missing from the checkpoint" in r.getMessage() and "up_proj" in r.getMessage() for r in caplog.records)
    full = BitNetForCausalLM.from_pretrained(saved["master"])
    up = model.get_submodule("model.layers.1.mlp.up_proj").weight
    assert isinstance(model.get_submodule("model.layers.1.mlp.up_proj"), BitLinear)
    assert up.isfinite().all() and up.std() > 0 and not torch.equal(up, full.get_submodule("model.layers.1.mlp.up_proj").weight)
    assert torch.equal(model.get_submodule("model.layers.0.input_layernorm").weight, torch.ones(64))  # RMSNorm init
    for key, value in full.state_dict().items():
        if key not in dropped:
            assert torch.equal(model.state_dict()[key], value), key


def test_missing_packed_projection_gets_valid_random_codes(saved, tmp_path):
    layer = "model.layers.0.self_attn.k_proj"
    path = _rewrite(saved["packed"], tmp_path / "partial",
                    lambda t: {k: v for k, v in t.items() if not k.startswith(layer + ".")})
    model, info = BitNetForCausalLM.from_pretrained(path, output_loading_info=True)
    assert set(info["missing_keys"]) == {f"{layer}.weight", f"{layer}.weight_scale"}
    module = model.get_submodule(layer)
    assert set(module.ternary_weight().unique().tolist()) == {-1, 0, 1}
    assert module.weight_scale.item() > 0
    assert _logits(model).isfinite().all()


def test_half_a_packed_pair_is_refused(saved, tmp_path):
    path = _rewrite(saved["packed"], tmp_path / "half",
                    lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.down_proj.weight_scale"})
    with pytest.raises(BitNetCheckpointError, match="down_proj.weight_scale is missing but .* is present"):
        BitNetForCausalLM.from_pretrained(path)


def test_unexpected_tensors_are_reported_not_fatal(saved, tmp_path):
    path = _rewrite(saved["packed"], tmp_path / "extra", lambda t: {**t, "model.extra_buffer": torch.zeros(3)})
    model, info = BitNetForCausalLM.from_pretrained(path, output_loading_info=True)
    assert set(info["unexpected_keys"]) == {"model.extra_buffer"} and not info["missing_keys"]


def test_a_checkpoint_of_something_else_is_still_refused(saved, tmp_path):
    path = _rewrite(saved["packed"], tmp_path / "other", lambda t: {"encoder.weight": torch.zeros(4, 4)})
    with pytest.raises(BitNetCheckpointError, match="not a BitNet/Llama-style checkpoint"):
        BitNetForCausalLM.from_pretrained(path)


# --- tied weights and base-model-prefix loading -----------------------------------------------------------


def test_tied_head_is_the_embedding_after_loading(saved):
    for form in ("master", "packed"):
        model, info = BitNetForCausalLM.from_pretrained(saved[form], output_loading_info=True)
        assert model.lm_head.weight is model.model.embed_tokens.weight, form
        assert "lm_head.weight" not in info["missing_keys"], form
        assert "lm_head.weight" not in load_file(os.path.join(saved[form], "model.safetensors"))


@pytest.mark.parametrize("packed", [False, True])
def test_base_model_checkpoint_loads_into_causal_lm_with_untied_head(tmp_path, packed):
    config = tiny_config(tie_word_embeddings=False)
    torch.manual_seed(3)
    base = BitNetModel(config).eval()
    base.save_pretrained(tmp_path / "base", packed=packed)
    assert not any(k.startswith("model.") for k in load_file(tmp_path / "base" / "model.safetensors"))
    model, info = BitNetForCausalLM.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert set(info["missing_keys"]) == {"lm_head.weight"} and not info["unexpected_keys"]
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.lm_head.weight.isfinite().all() and model.lm_head.weight.std() > 0
    reference = BitNetModel.from_pretrained(tmp_path / "base").eval()
    torch.testing.assert_close(_hidden(model.model), _hidden(reference), rtol=0, atol=0)
    if not packed:
        torch.testing.assert_close(_hidden(model.model), _hidden(base), rtol=0, atol=0)
    # and back: the causal LM's checkpoint into the base model, its head reported as unexpected
    model.save_pretrained(tmp_path / "causal")
    back, info = BitNetModel.from_pretrained(tmp_path / "causal", output_loading_info=True)
    assert set(info["unexpected_keys"]) == {"lm_head.weight"} and not info["missing_keys"]
    torch.testing.assert_close(_hidden(back), _hidden(reference), rtol=0, atol=0)


def test_base_model_checkpoint_into_tied_causal_lm_misses_nothing(tmp_path):
    base = BitNetModel(tiny_config()).eval()
    base.save_pretrained(tmp_path / "base")
    model, info = BitNetForCausalLM.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert not info["missing_keys"] and model.lm_head.weight is model.model.embed_tokens.weight


# --- GenerationMixin and num_parameters -------------------------------------------------------------------


def test_causal_lm_lists_generation_mixin_among_its_bases(saved):
    assert GenerationMixin in BitNetForCausalLM.__bases__
    assert BitNetForCausalLM.can_generate() and not BitNetModel.can_generate()
    model = BitNetForCausalLM.from_pretrained(saved["packed"])
    assert model.generation_config.bos_token_id == 1
    out = model.generate(IDS[:, :3], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("tied", [True, False])
def test_num_parameters_counts_packed_weights_as_their_logical_values(tied):
    config = tiny_config(tie_word_embeddings=tied)
    master = BitNetForCausalLM(config)
    packed = BitNetForCausalLM.from_config(config, packed=True)
    hidden, inter, vocab, layers = 64, 128, 256, 2
    q, kv = 64, 32
    per_layer = (2 * q * hidden + 2 * kv * hidden) + 3 * inter * hidden + 3 * hidden + inter
    expected = vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden
    assert master.num_parameters() == expected
    assert packed.num_parameters() == expected, "packed uint8 codes must count four parameters a byte"
    non_embedding = expected - vocab * hidden
    assert master.num_parameters(exclude_embeddings=True) == packed.num_parameters(exclude_embeddings=True) == non_embedding
    trainable_norms = layers * (3 * hidden + inter) + hidden + vocab * hidden * (1 if tied else 2)
    assert packed.num_parameters(only_trainable=True) == trainable_norms
    assert master.num_parameters(only_trainable=True) == expected
    for head, embedding in ((True, False), (False, True), (True, True)):  # int8 buffers count as their values
        int8 = BitNetForCausalLM.from_config(config, packed=True).quantize_output_layers(lm_head=head, embedding=embedding)
        assert int8.num_parameters() == expected, (head, embedding)
        assert int8.num_parameters(exclude_embeddings=True) == non_embedding, (head, embedding)
    # the memory footprint stays the bytes actually held
    held = sum(t.numel() * t.element_size() for t in list(packed.parameters()) + list(packed.buffers()))
    assert packed.get_memory_footprint() == held
    assert packed.get_memory_footprint() < master.get_memory_footprint()


def test_sharded_index_records_the_logical_parameter_count(tmp_path):
    import json

    packed = BitNetForCausalLM.from_config(tiny_config(), packed=True)
    packed.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = json.load(open(tmp_path / "sharded" / "model.safetensors.index.json"))
    assert index["metadata"]["total_parameters"] == packed.num_parameters() == BitNetForCausalLM(tiny_config()).num_parameters()
    again = BitNetForCausalLM.from_pretrained(tmp_path / "sharded")
    for key, value in packed.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
