"""BitNetForCausalLM: parity with Transformers' own BitNet, checkpoint forms, interop, generation, errors.

Tiny random models (hidden 64, 2 layers, vocab 256) are built here; checkpoints are written to tmp folders.
Transformers' BitNet layers wrap their helpers in ``torch.compile``; the comparisons run them eagerly
(``torch._dynamo`` disabled) — same numbers, no compile time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from bitnet_torch.models import (
    LLAMA3_CHAT_TEMPLATE,
    BitNetCheckpointError,
    BitNetConfig,
    BitNetForCausalLM,
    BitNetModel,
    apply_llama3_chat_template,
    convert_llama_to_bitnet,
)
from bitnet_torch.nn import BitLinear, Int8Embedding, Int8Linear, PackedBitLinear

PROJECTION = "model.layers.0.mlp.gate_proj"


def tiny_config(**overrides) -> BitNetConfig:
    values = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        initializer_range=0.3,  # large enough that greedy decoding of a random model does not collapse at once
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    values.update(overrides)
    return BitNetConfig(**values)


@pytest.fixture(scope="module")
def master_model() -> BitNetForCausalLM:
    torch.manual_seed(1234)
    return BitNetForCausalLM(tiny_config()).eval()


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(7))


def _write_divide_convention(packed_dir: str, out_dir: str) -> None:
    """Rewrite a packed checkpoint in the ``bitlinear`` convention (weight_scale = 1 / mean|W|)."""
    shutil.copytree(packed_dir, out_dir)
    tensors = load_file(os.path.join(packed_dir, "model.safetensors"))
    for key in list(tensors):
        if key.endswith("weight_scale"):
            tensors[key] = tensors[key].float().reciprocal().to(tensors[key].dtype)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config_path = os.path.join(out_dir, "config.json")
    config = json.load(open(config_path))
    config["quantization_config"]["linear_class"] = "bitlinear"
    json.dump(config, open(config_path, "w"))


@pytest.fixture(scope="module")
def checkpoints(master_model, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bitnet_checkpoints")
    paths = {name: str(root / name) for name in ("master", "packed", "divide")}
    master_model.save_pretrained(paths["master"], packed=False)
    master_model.save_pretrained(paths["packed"], packed=True)
    _write_divide_convention(paths["packed"], paths["divide"])
    return paths


def _hf_logits(path: str, ids: torch.Tensor) -> torch.Tensor:
    with torch._dynamo.config.patch(disable=True), torch.no_grad():
        model = transformers.BitNetForCausalLM.from_pretrained(path, dtype=torch.float32)
        return model(ids).logits


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# --- checkpoint forms -------------------------------------------------------------------------------------


def test_packed_checkpoint_has_microsoft_layout(checkpoints):
    config = json.load(open(os.path.join(checkpoints["packed"], "config.json")))
    assert config["model_type"] == "bitnet"
    assert config["architectures"] == ["BitNetForCausalLM"]
    assert config["quantization_config"] == {
        "quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"
    }
    with safe_open(os.path.join(checkpoints["packed"], "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        weight, scale = f.get_tensor(f"{PROJECTION}.weight"), f.get_tensor(f"{PROJECTION}.weight_scale")
    assert weight.dtype == torch.uint8 and tuple(weight.shape) == (128 // 4, 64)
    assert scale.dtype == torch.float32 and tuple(scale.shape) == (1,)
    assert "lm_head.weight" not in keys, "tied lm_head must not be stored twice"
    master = json.load(open(os.path.join(checkpoints["master"], "config.json")))
    assert master["quantization_config"]["quantization_mode"] == "online"


@pytest.mark.parametrize("form", ["packed", "divide"])
def test_packed_logits_match_transformers_bitnet(checkpoints, input_ids, form):
    ours = BitNetForCausalLM.from_pretrained(checkpoints[form])
    layer = ours.get_submodule(PROJECTION)
    assert isinstance(layer, PackedBitLinear)
    assert layer.scale_convention == ("multiply" if form == "packed" else "divide")
    theirs = _hf_logits(checkpoints[form], input_ids)
    torch.testing.assert_close(_logits(ours, input_ids), theirs, rtol=1e-5, atol=1e-5)


def test_master_logits_match_transformers_online(checkpoints, master_model, input_ids):
    loaded = BitNetForCausalLM.from_pretrained(checkpoints["master"])
    assert isinstance(loaded.get_submodule(PROJECTION), BitLinear)
    torch.testing.assert_close(_logits(loaded, input_ids), _logits(master_model, input_ids), rtol=0, atol=0)
    torch.testing.assert_close(_logits(loaded, input_ids), _hf_logits(checkpoints["master"], input_ids),
                               rtol=1e-5, atol=1e-5)


def test_master_and_every_packed_route_give_identical_logits(checkpoints, master_model, input_ids):
    reference = _logits(master_model, input_ids)
    routes = {
        "load packed": BitNetForCausalLM.from_pretrained(checkpoints["packed"]),
        "pack while loading master": BitNetForCausalLM.from_pretrained(checkpoints["master"], packed=True),
        "pack in place": BitNetForCausalLM.from_pretrained(checkpoints["master"]).pack(),
    }
    for route, model in routes.items():
        assert model.is_packed, route
        assert not hasattr(model, "hf_quantizer") or model.hf_quantizer is None, route
        assert model.config.quantization_config["quantization_mode"] == "offline", route
        assert all(isinstance(m, PackedBitLinear) for _, m in model.model.projections()), route
        torch.testing.assert_close(_logits(model, input_ids), reference, rtol=0, atol=0, msg=route)


def test_round_trips_are_exact(checkpoints, tmp_path):
    for form, packed in (("packed", True), ("master", False), ("divide", True)):
        model = BitNetForCausalLM.from_pretrained(checkpoints[form])
        model.save_pretrained(tmp_path / form, packed=packed)
        again = load_file(os.path.join(tmp_path / form, "model.safetensors"))
        original = load_file(os.path.join(checkpoints["packed" if form == "divide" else form], "model.safetensors"))
        assert again.keys() == original.keys(), form
        for key in original:
            if form == "divide" and key.endswith("weight_scale"):
                # 1/(1/s) in fp32: written back in the multiply convention, equal up to one rounding
                torch.testing.assert_close(again[key], original[key], rtol=1e-6, atol=0)
            else:
                assert torch.equal(again[key], original[key]), f"{form}: {key} changed in the round trip"
        saved = json.load(open(tmp_path / form / "config.json"))["quantization_config"]
        assert saved["linear_class"] == "autobitlinear"


def test_packed_model_refuses_to_save_master_weights(checkpoints, tmp_path):
    model = BitNetForCausalLM.from_pretrained(checkpoints["packed"])
    with pytest.raises(ValueError, match="master weights do not exist"):
        model.save_pretrained(tmp_path / "x", packed=False)


def test_bf16_packed_load_keeps_codes_and_scales_in_model_dtype(checkpoints, input_ids):
    model = BitNetForCausalLM.from_pretrained(checkpoints["packed"], dtype=torch.bfloat16)
    layer = model.get_submodule(PROJECTION)
    assert layer.weight.dtype == torch.uint8 and layer.weight_scale.dtype == torch.bfloat16
    fp32 = BitNetForCausalLM.from_pretrained(checkpoints["packed"])
    logits = _logits(model, input_ids)
    assert logits.dtype == torch.bfloat16
    reference = _logits(fp32, input_ids)
    assert (logits.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_from_config_packed_allocates_no_float_projection():
    model = BitNetForCausalLM.from_config(tiny_config(), packed=True)
    for name, layer in model.model.projections():
        assert isinstance(layer, PackedBitLinear), name
        assert layer.weight.dtype == torch.uint8
        codes = layer.ternary_weight()  # validates: no code 3
        assert set(codes.unique().tolist()) == {-1, 0, 1}
    assert not any(p.dtype.is_floating_point and p.dim() == 2 and p.shape[0] != 256 for p in model.parameters())
    assert model(torch.tensor([[5, 6, 7]])).logits.isfinite().all()


# --- plain Transformers interop ---------------------------------------------------------------------------

_PLAIN_TRANSFORMERS_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    torch._dynamo.config.disable = True
    import transformers
    from safetensors.torch import load_file, save_file

    ids = load_file(sys.argv[1])["ids"]
    out = {}
    for name, path in zip(sys.argv[3::2], sys.argv[4::2]):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        assert type(model) is transformers.BitNetForCausalLM, type(model)
        with torch.no_grad():
            out[name] = model(ids).logits.contiguous()
    assert "bitnet_torch" not in sys.modules, "the interop check must not import bitnet_torch"
    save_file(out, sys.argv[2])
    """
)


def test_plain_transformers_loads_our_checkpoints_with_same_logits(checkpoints, master_model, input_ids, tmp_path):
    ids_path, out_path = str(tmp_path / "ids.safetensors"), str(tmp_path / "logits.safetensors")
    save_file({"ids": input_ids.contiguous()}, ids_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = [sys.executable, "-c", _PLAIN_TRANSFORMERS_SCRIPT, ids_path, out_path,
            "packed", checkpoints["packed"], "master", checkpoints["master"]]
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = load_file(out_path)
    reference = _logits(master_model, input_ids)
    for name in ("packed", "master"):
        torch.testing.assert_close(theirs[name], reference, rtol=1e-5, atol=1e-5, msg=name)


def test_auto_classes_resolve_bitnet_to_ours(checkpoints, input_ids, tmp_path):
    assert type(AutoConfig.from_pretrained(checkpoints["packed"])) is BitNetConfig
    model = AutoModelForCausalLM.from_pretrained(checkpoints["packed"])
    assert type(model) is BitNetForCausalLM and model.is_packed
    base = AutoModel.from_pretrained(checkpoints["master"])
    assert type(base) is BitNetModel
    assert isinstance(base.layers[0].mlp.up_proj, BitLinear)
    base.save_pretrained(tmp_path / "base", packed=True)  # base-model checkpoints name tensors without "model."
    reloaded = BitNetModel.from_pretrained(tmp_path / "base")
    assert reloaded.is_packed
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).last_hidden_state, base(input_ids).last_hidden_state,
                                   rtol=0, atol=0)


# --- generation -------------------------------------------------------------------------------------------


def test_greedy_generation_is_identical_with_and_without_cache(checkpoints):
    model = BitNetForCausalLM.from_pretrained(checkpoints["packed"])
    prompt = torch.tensor([[1, 40, 41, 42, 43]])
    with_cache = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    without_cache = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without_cache)
    assert len(set(with_cache[0, 5:].tolist())) > 2, "degenerate test model: greedy output collapsed"


def test_grouped_projections_equal_separate_layer_calls(checkpoints, input_ids):
    """q/k/v and gate/up run as one grouped op; a hook on a projection forces separate calls: same logits."""
    model = BitNetForCausalLM.from_pretrained(checkpoints["packed"], dtype=torch.bfloat16)
    grouped = _logits(model, input_ids)
    calls = []
    hooks = [
        layer.get_submodule(name).register_forward_hook(lambda *args: calls.append(1))
        for layer in model.model.layers
        for name in ("self_attn.k_proj", "mlp.up_proj")
    ]
    try:
        separate = _logits(model, input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(calls) == 2 * len(model.model.layers), "the hooked projections were not called one by one"
    assert torch.equal(grouped, separate)


def test_global_forward_hooks_see_every_projection(checkpoints, input_ids):
    model = BitNetForCausalLM.from_pretrained(checkpoints["packed"])
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: seen.append(module) if isinstance(module, PackedBitLinear) else None
    )
    try:
        _logits(model, input_ids)
    finally:
        handle.remove()
    assert len(seen) == 7 * len(model.model.layers)


def test_a_static_cache_too_short_for_the_request_is_refused_clearly(checkpoints):
    from bitnet_torch.models import compiled_decode_kwargs

    model = BitNetForCausalLM.from_pretrained(checkpoints["packed"])
    prompt = torch.tensor([[1, 40, 41, 42, 43]])
    kwargs = compiled_decode_kwargs(model, prompt, 4, bucket=16)  # 16 positions
    with pytest.raises(ValueError, match=r"holds 16 positions but this generate\(\) call needs 35"):
        model.generate(prompt, max_new_tokens=30, do_sample=False, **kwargs)


@pytest.mark.parametrize("q_len", [1, 5])
def test_cpu_gqa_attention_equals_transformers_sdpa(q_len):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from bitnet_torch.models.attention import attend

    model = BitNetForCausalLM.from_config(tiny_config(), packed=True, attn_implementation="sdpa")
    module = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, q_len, 16, generator=gen)
    key, value = torch.randn(2, 2, 9, 16, generator=gen), torch.randn(2, 2, 9, 16, generator=gen)
    mask = torch.zeros(2, 1, q_len, 9)
    mask[1, :, :, :3] = float("-inf")  # a left-padded row
    ours, _ = attend(module, query, key, value, mask, dropout=0.0, scaling=0.25)
    with torch._dynamo.config.patch(disable=True):
        reference, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=0.0, scaling=0.25)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)


def test_compiled_static_cache_decode_matches_eager(checkpoints):
    """generate() with compiled_decode_kwargs (static cache, torch.compile'd step on CPU) = eager greedy output."""
    from bitnet_torch.models import compiled_decode_kwargs

    model = BitNetForCausalLM.from_pretrained(checkpoints["packed"])
    batch = torch.tensor([[1, 17, 99, 23, 250, 8, 77], [0, 0, 0, 0, 1, 64, 5]])
    mask = (batch != 0).long()
    torch._dynamo.reset()
    with torch.inference_mode():
        eager = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False)
        compiled = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                  **compiled_decode_kwargs(model, batch, 8, bucket=32))
    assert torch.equal(eager, compiled)


def test_batched_generation_with_left_padding_matches_single_prompts(checkpoints):
    model = BitNetForCausalLM.from_pretrained(checkpoints["packed"])
    long_prompt, short_prompt = [1, 17, 99, 23, 250, 8, 77], [1, 64, 5]
    batch = torch.tensor([long_prompt, [0] * 4 + short_prompt])
    mask = torch.tensor([[1] * 7, [0] * 4 + [1] * 3])
    batched = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for row, prompt in enumerate((long_prompt, short_prompt)):
        single = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
        assert batched[row, 7:].tolist() == single[0, len(prompt):].tolist(), f"row {row}"


def test_sampling_is_reproducible_and_in_vocabulary(checkpoints):
    model = BitNetForCausalLM.from_pretrained(checkpoints["packed"])
    prompt = torch.tensor([[1, 40, 41]])
    outputs = []
    for _ in range(2):
        torch.manual_seed(3)
        outputs.append(model.generate(prompt, max_new_tokens=10, do_sample=True, top_k=50, temperature=0.9))
    assert torch.equal(outputs[0], outputs[1])
    assert outputs[0].shape == (1, 13) and int(outputs[0].max()) < 256


def test_llama3_chat_template_renders_spec_prompt():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|begin_of_text|>": 0, "<|eot_id|>": 1, "<unk>": 2, "hi": 3, "there": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", unk_token="<unk>",
                                        additional_special_tokens=["<|eot_id|>"])
    apply_llama3_chat_template(tokenizer)
    assert tokenizer.chat_template == LLAMA3_CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|begin_of_text|>System: Be brief.<|eot_id|>User: hi there<|eot_id|>Assistant: "


# --- bad checkpoints --------------------------------------------------------------------------------------


def test_not_a_bitnet_checkpoint_is_refused(tmp_path):
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    llama.save_pretrained(tmp_path / "llama")
    with pytest.raises(BitNetCheckpointError, match="model_type 'llama'"):
        BitNetForCausalLM.from_pretrained(tmp_path / "llama")


def test_foreign_quantization_method_is_refused(checkpoints, tmp_path):
    shutil.copytree(checkpoints["packed"], tmp_path / "gptq")
    config = json.load(open(tmp_path / "gptq" / "config.json"))
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    json.dump(config, open(tmp_path / "gptq" / "config.json", "w"))
    with pytest.raises(BitNetCheckpointError, match="quant_method is 'gptq'"):
        BitNetForCausalLM.from_pretrained(tmp_path / "gptq")


@pytest.mark.parametrize("damage", ["truncated", "garbage_header"])
def test_corrupt_safetensors_is_refused(checkpoints, tmp_path, damage):
    target = tmp_path / damage
    shutil.copytree(checkpoints["packed"], target)
    weights = target / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100] if damage == "truncated" else data[:8] + b"\xff" * 64 + data[72:])
    with pytest.raises(BitNetCheckpointError, match="truncated|corrupt|not a safetensors"):
        BitNetForCausalLM.from_pretrained(target)


def test_shapes_that_disagree_with_the_config_are_refused(checkpoints, tmp_path):
    shutil.copytree(checkpoints["packed"], tmp_path / "wrong")
    config = json.load(open(tmp_path / "wrong" / "config.json"))
    config["intermediate_size"] = 256
    json.dump(config, open(tmp_path / "wrong" / "config.json", "w"))
    with pytest.raises(BitNetCheckpointError, match="gate_proj.weight is U8 \\(32, 64\\)"):
        BitNetForCausalLM.from_pretrained(tmp_path / "wrong")


def test_master_weights_under_an_offline_config_are_refused(checkpoints, tmp_path):
    shutil.copytree(checkpoints["master"], tmp_path / "mislabelled")
    config = json.load(open(tmp_path / "mislabelled" / "config.json"))
    config["quantization_config"]["quantization_mode"] = "offline"
    json.dump(config, open(tmp_path / "mislabelled" / "config.json", "w"))
    with pytest.raises(BitNetCheckpointError, match="master checkpoint whose config says offline"):
        BitNetForCausalLM.from_pretrained(tmp_path / "mislabelled")


def test_pickle_only_checkpoint_is_refused_without_unpickling(checkpoints, tmp_path):
    target = tmp_path / "pickled"
    target.mkdir()
    shutil.copy(os.path.join(checkpoints["packed"], "config.json"), target)
    (target / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(BitNetCheckpointError, match="pickle"):
        BitNetForCausalLM.from_pretrained(target)
    with pytest.raises(ValueError, match="safetensors"):
        BitNetForCausalLM.from_pretrained(checkpoints["packed"], use_safetensors=False)


def test_packed_checkpoint_cannot_become_trainable(checkpoints):
    with pytest.raises(BitNetCheckpointError, match="cannot be loaded as a trainable model"):
        BitNetForCausalLM.from_pretrained(checkpoints["packed"], packed=False)


# --- int8 output head -------------------------------------------------------------------------------------


def test_int8_head_shares_the_embedding_and_stays_close(checkpoints, input_ids, tmp_path):
    float_model = BitNetForCausalLM.from_pretrained(checkpoints["packed"])
    model = BitNetForCausalLM.from_pretrained(checkpoints["packed"], quantize_lm_head=True, quantize_embedding=True)
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.model.embed_tokens, Int8Embedding)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "int8 tensor not shared"
    reference, logits = _logits(float_model, input_ids), _logits(model, input_ids)
    relative = ((logits - reference).abs().max() / reference.abs().max()).item()
    assert relative < 0.05, f"int8 head moved the logits by {relative:.3%} of their range"
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert agreement > 0.8, f"top-1 agreement {agreement:.2f}"
    model.save_pretrained(tmp_path / "int8")
    written = load_file(os.path.join(tmp_path / "int8", "model.safetensors"))
    assert written["model.embed_tokens.weight"].dtype == torch.float32 and "lm_head.weight" not in written
    assert json.load(open(tmp_path / "int8" / "config.json"))["quantize_lm_head"] is True


# --- conversion -------------------------------------------------------------------------------------------


def test_convert_llama_keeps_weights_and_inserts_unit_subln_norms():
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False)).eval()
    ids = torch.randint(0, 128, (2, 9))
    expected = _logits(llama, ids)
    q_weight = llama.model.layers[1].self_attn.q_proj.weight
    model = convert_llama_to_bitnet(llama)
    layer = model.model.layers[1]
    assert isinstance(layer.self_attn.q_proj, BitLinear)
    assert layer.self_attn.q_proj.weight.data_ptr() == q_weight.data_ptr(), "weights must be shared, not copied"
    assert torch.equal(layer.self_attn.attn_sub_norm.weight, torch.ones(64))
    assert model.config.hidden_act == "silu" and not model.is_packed
    # With lambda = 0 (no quantization) and the sub-norms bypassed, the model is the Llama model exactly.
    from bitnet_torch import set_lambda

    set_lambda(model, 0.0)
    for decoder_layer in model.model.layers:
        decoder_layer.self_attn.attn_sub_norm = torch.nn.Identity()
        decoder_layer.mlp.ffn_sub_norm = torch.nn.Identity()
    torch.testing.assert_close(_logits(model, ids), expected, rtol=1e-5, atol=1e-5)


def test_int8_row_quantization_in_chunks_equals_one_pass():
    from bitnet_torch import quantize_activation
    from bitnet_torch.nn.int8_linear import quantize_rows

    weight = torch.randn(2 * 4096 + 5, 16, dtype=torch.bfloat16)
    codes, scales = quantize_rows(weight)
    expected_codes, expected_scales = quantize_activation(weight)
    assert torch.equal(codes, expected_codes) and torch.equal(scales, expected_scales.reshape(-1))
