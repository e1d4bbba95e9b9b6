"""Plain peft and trl on packed BitNet models: no bitnet_torch helper, only ``import bitnet_torch``.

What users write (``get_peft_model(model, LoraConfig(target_modules="all-linear"))``, ``SFTTrainer(peft_config=...)``,
``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM.from_pretrained``, ``model.load_adapter``,
``merge_and_unload``) on a packed tiny checkpoint, checked against an independent float reference: each packed
projection as an ``nn.Linear`` holding its dequantized weight ``W_t * mean|W|`` applied to the fake-quantized
(int8, straight-through) input.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer

import bitnet_torch  # noqa: F401 - the import is what makes plain peft work on packed models
from bitnet_torch.models import BitNetForCausalLM
from bitnet_torch.nn import BitLinear, PackedBitLinear
from bitnet_torch.nn.lora_layers import PackedBitLinearLoraLayer, PackedMergeError
from bitnet_torch.quant import fake_quantize_activation
from peft_helpers import logits_of_adapter_in_a_fresh_process
from test_gguf_helpers import make_tiny_checkpoint

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REPO = Path(__file__).resolve().parents[1]


def _projection_names(num_layers: int = 2) -> set[str]:
    parent = {p: "self_attn" if p in PROJECTIONS[:4] else "mlp" for p in PROJECTIONS}
    return {f"model.layers.{i}.{parent[p]}.{p}" for i in range(num_layers) for p in PROJECTIONS}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft_plain")
    return {
        "packed": make_tiny_checkpoint(root / "packed", form="packed", hidden_size=64, intermediate_size=128),
        "master": make_tiny_checkpoint(root / "master", form="float", hidden_size=64, intermediate_size=128),
        # Microsoft's layout: linear_class "bitlinear", weight_scale = 1 / mean|W|.
        "packed_divide": make_tiny_checkpoint(
            root / "packed_divide", form="packed_divide", hidden_size=64, intermediate_size=128
        ),
    }


@pytest.fixture()
def packed(checkpoints) -> BitNetForCausalLM:
    return BitNetForCausalLM.from_pretrained(checkpoints["packed"]).eval()


@pytest.fixture()
def ids(packed) -> torch.Tensor:
    return torch.randint(3, packed.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))


def _randomize_adapters(model: nn.Module, scale: float = 0.05, seed: int = 2) -> None:
    """Non-zero lora_A and lora_B (peft starts B at zero, which would make every comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _adapted(model: nn.Module) -> dict[str, nn.Module]:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


class DequantizedLinear(nn.Linear):
    """Float reference of a PackedBitLinear: ``F.linear(fake_quant_int8(x), W_t * mean|W|)`` (STE gradient)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quantize_activation(x), self.weight, self.bias)


class MergedFloatReference(nn.Module):
    """A packed projection with its adapter merged in float: ``F.linear(fq(x), W_deq) + F.linear(x, s * B @ A)``."""

    def __init__(self, weight: torch.Tensor, delta: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("delta", delta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quantize_activation(x), self.weight) + F.linear(x, self.delta.to(x.dtype))


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """``|got - expected| / |expected|`` (Frobenius). The integer kernel and the float reference agree per layer to
    ~2e-7, but that last-place difference can move a later layer's int8 activation code by one, so whole-model
    logits are compared as a whole rather than element by element."""
    return float((got.float() - expected.float()).norm() / expected.float().norm())


def _float_reference(packed_model: BitNetForCausalLM) -> BitNetForCausalLM:
    reference = copy.deepcopy(packed_model)
    for name, module in list(reference.named_modules()):
        if isinstance(module, PackedBitLinear):
            linear = DequantizedLinear(module.in_features, module.out_features, bias=False)
            with torch.no_grad():
                linear.weight.copy_(module.dequantized_weight())
            reference.set_submodule(name, linear)
    return reference


# -- which layers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets", ["all-linear", list(PROJECTIONS), None], ids=["all-linear", "named", "default"])
def test_plain_lora_config_adapts_exactly_the_seven_packed_projections(packed, targets):
    config = LoraConfig(target_modules=targets, r=4)
    assert config._custom_modules is None  # nothing registered by the user
    peft_model = get_peft_model(packed, config)
    adapted = _adapted(peft_model)
    assert set(adapted) == _projection_names()
    assert all(type(m) is PackedBitLinearLoraLayer for m in adapted.values())
    assert all(isinstance(m.get_base_layer(), PackedBitLinear) for m in adapted.values())
    assert not isinstance(peft_model.base_model.model.lm_head, LoraLinear)


def test_divide_convention_checkpoint_gets_the_seven_adapters_computing_the_float_reference(checkpoints):
    model = BitNetForCausalLM.from_pretrained(checkpoints["packed_divide"]).eval()
    assert {m.scale_convention for m in model.modules() if isinstance(m, PackedBitLinear)} == {"divide"}
    peft_model = get_peft_model(model, LoraConfig(target_modules="all-linear", r=4))
    adapted = _adapted(peft_model)
    assert set(adapted) == _projection_names()
    _randomize_adapters(peft_model)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, layer in adapted.items():
            x = torch.randn(4, layer.in_features, generator=g)
            base = layer.get_base_layer()
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            lora = (x @ a.T @ b.T) * layer.scaling["default"]
            expected = F.linear(fake_quantize_activation(x), base.dequantized_weight()) + lora
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5, msg=name)


def test_bfloat16_packed_model_trains_float32_adapters(checkpoints, ids):
    model = BitNetForCausalLM.from_pretrained(checkpoints["packed"], dtype=torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(target_modules="all-linear", r=4, init_lora_weights="gaussian"))
    assert {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n} == {torch.float32}
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_all_linear_on_a_master_base_adapts_the_seven_bitlinear_projections(checkpoints):
    master = BitNetForCausalLM.from_pretrained(checkpoints["master"])
    adapted = _adapted(get_peft_model(master, LoraConfig(target_modules="all-linear", r=4)))
    assert set(adapted) == _projection_names()
    assert all(type(m) is LoraLinear and type(m.get_base_layer()) is BitLinear for m in adapted.values())


# -- gradients -------------------------------------------------------------------------------------------------


class _OneLayer(nn.Module):
    """One projection as a model (with a parameter: peft reads the device from the first one)."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_layer_gradients_through_the_packed_base_equal_the_float_reference(packed):
    layer = packed.model.layers[0].mlp.down_proj
    reference = DequantizedLinear(layer.in_features, layer.out_features, bias=False)
    with torch.no_grad():
        reference.weight.copy_(layer.dequantized_weight())
    lora_packed = get_peft_model(_OneLayer(layer), LoraConfig(target_modules=["proj"], r=4))
    lora_ref = get_peft_model(_OneLayer(reference), LoraConfig(target_modules=["proj"], r=4))
    _randomize_adapters(lora_packed)
    _randomize_adapters(lora_ref)
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(3))
    x_packed, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    upstream = torch.randn(3, 5, layer.out_features, generator=torch.Generator().manual_seed(4))
    y_packed, y_ref = lora_packed(x_packed), lora_ref(x_ref)
    torch.testing.assert_close(y_packed, y_ref, rtol=1e-5, atol=1e-5)
    (y_packed * upstream).sum().backward()
    (y_ref * upstream).sum().backward()
    torch.testing.assert_close(x_packed.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    grads_packed = {n: p.grad for n, p in lora_packed.named_parameters() if p.requires_grad}
    grads_ref = {n: p.grad for n, p in lora_ref.named_parameters() if p.requires_grad}
    assert set(grads_packed) == set(grads_ref) and len(grads_packed) == 2
    for name in grads_packed:
        torch.testing.assert_close(grads_packed[name], grads_ref[name], rtol=1e-5, atol=1e-6)


def test_model_adapter_gradients_equal_the_float_reference_and_only_adapters_get_them(packed, ids):
    reference = _float_reference(packed)
    lora_packed = get_peft_model(packed, LoraConfig(target_modules="all-linear", r=4))
    lora_ref = get_peft_model(reference, LoraConfig(target_modules="all-linear", r=4))
    _randomize_adapters(lora_packed)
    _randomize_adapters(lora_ref)
    loss_packed = lora_packed(input_ids=ids, labels=ids).loss
    loss_ref = lora_ref(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss_packed, loss_ref, rtol=1e-4, atol=1e-4)
    loss_packed.backward()
    loss_ref.backward()
    with_grad = {n for n, p in lora_packed.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in lora_packed.named_parameters() if "lora_" in n}
    assert len(with_grad) == 2 * len(_projection_names())
    ref_grads = dict(lora_ref.named_parameters())
    for name, p in lora_packed.named_parameters():
        if p.grad is not None:
            expected = ref_grads[name].grad
            error = (p.grad - expected).norm() / expected.norm().clamp_min(1e-12)
            assert error < 1e-3, f"{name}: relative gradient error {error:.2e}"


# -- trl: train, save, reload ------------------------------------------------------------------------------------


def _packed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items() if "lora_" not in n}


def test_sft_trainer_trains_only_the_adapter_and_every_reload_path_restores_it(checkpoints, tmp_path, ids):
    from trl import SFTConfig, SFTTrainer

    model = BitNetForCausalLM.from_pretrained(checkpoints["packed"])
    before = _packed_state(model)
    tokenizer = AutoTokenizer.from_pretrained(checkpoints["packed"])
    dataset = datasets.Dataset.from_dict({"text": ["In the beginning God created the heaven and the earth."] * 24})
    args = SFTConfig(
        output_dir=str(tmp_path / "trainer"), max_steps=6, learning_rate=1e-2, per_device_train_batch_size=4,
        logging_steps=1, save_strategy="no", report_to=[], bf16=False, disable_tqdm=True, max_length=32, seed=0,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=LoraConfig(target_modules="all-linear", r=8, lora_alpha=16),
    )
    adapters_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0], losses

    peft_model = trainer.model
    assert set(_adapted(peft_model)) == _projection_names()
    after = _packed_state(peft_model.get_base_model())
    assert {k.replace(".base_layer", "") for k in after} == set(before)
    for key, value in after.items():
        assert torch.equal(value, before[key.replace(".base_layer", "")]), f"base tensor {key} changed"
    changed = [n for n, p in peft_model.named_parameters() if "lora_B" in n and not torch.equal(p, adapters_before[n])]
    assert len(changed) == len(_projection_names())

    peft_model.eval()
    with torch.no_grad():
        trained = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base_logits = peft_model(input_ids=ids).logits
    assert not torch.equal(trained, base_logits)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert Path(saved["base_model_name_or_path"]).resolve() == Path(checkpoints["packed"]).resolve()
    assert all(k.count("lora_") == 1 for k in load_file(adapter_dir / "adapter_model.safetensors"))

    # 1. PeftModel.from_pretrained on a fresh packed base.
    reloaded = PeftModel.from_pretrained(BitNetForCausalLM.from_pretrained(checkpoints["packed"]), adapter_dir)
    # 2. AutoPeftModelForCausalLM (base model found through adapter_config.json).
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    assert isinstance(auto.get_base_model(), BitNetForCausalLM)
    # 3. Transformers' load_adapter on the model itself.
    direct = BitNetForCausalLM.from_pretrained(checkpoints["packed"])
    direct.load_adapter(str(adapter_dir))
    # 4. Transformers' AutoModelForCausalLM on the adapter directory (loads the base, then load_adapter).
    from transformers import AutoModelForCausalLM

    via_transformers = AutoModelForCausalLM.from_pretrained(adapter_dir)
    assert isinstance(via_transformers, BitNetForCausalLM)
    for restored in (reloaded, auto, direct, via_transformers):
        assert set(_adapted(restored)) == _projection_names()
        with torch.no_grad():
            assert torch.equal(restored.eval()(input_ids=ids).logits, trained)

    # Transformers' adapter methods on the load_adapter model (gated on peft >= 0.22 by Transformers itself).
    assert direct.active_adapters() == ["default"]
    direct.disable_adapters()
    with torch.no_grad():
        assert torch.equal(direct(input_ids=ids).logits, base_logits)
    direct.enable_adapters()
    state = direct.get_adapter_state_dict()
    assert len(state) == 2 * len(_projection_names())
    direct.save_pretrained(tmp_path / "resaved")
    assert load_file(tmp_path / "resaved" / "adapter_model.safetensors").keys() == load_file(
        adapter_dir / "adapter_model.safetensors"
    ).keys()


def test_auto_peft_model_loads_in_a_fresh_process_from_another_directory(checkpoints, tmp_path, ids):
    peft_model = get_peft_model(BitNetForCausalLM.from_pretrained(checkpoints["packed"]), LoraConfig(r=4))
    _randomize_adapters(peft_model)
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=ids).logits
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    assert torch.equal(logits_of_adapter_in_a_fresh_process(adapter_dir, ids, tmp_path), expected)


# -- generation --------------------------------------------------------------------------------------------------


def test_peft_generate_gives_the_tokens_of_the_merged_float_reference(packed, ids, tmp_path):
    peft_model = get_peft_model(copy.deepcopy(packed), LoraConfig(target_modules="all-linear", r=4, lora_alpha=16))
    _randomize_adapters(peft_model, scale=0.2)
    reference = copy.deepcopy(packed)
    for name, layer in _adapted(peft_model).items():
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
        reference.set_submodule(name, MergedFloatReference(layer.get_base_layer().dequantized_weight(), delta.detach()))
    prompt = ids[:1, :6]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=packed.config.eos_token_id, eos_token_id=None)
    with torch.no_grad():
        assert _relative_error(peft_model.eval()(input_ids=prompt).logits, reference(input_ids=prompt).logits) < 1e-4
        got = peft_model.generate(input_ids=prompt, **kwargs)
        expected = reference.generate(input_ids=prompt, **kwargs)
        with peft_model.disable_adapter():
            base = peft_model.generate(input_ids=prompt, **kwargs)
    assert torch.equal(got, expected)
    assert not torch.equal(got, base), "the adapter should change what is generated (else the test proves nothing)"
    # The same adapter attached with Transformers' load_adapter: the model's own generate() must run it too.
    peft_model.save_pretrained(tmp_path / "adapter")
    direct = copy.deepcopy(packed)
    direct.load_adapter(str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(direct.eval().generate(input_ids=prompt, **kwargs), expected)


# -- merging ----------------------------------------------------------------------------------------------------


def test_merge_on_a_packed_base_is_refused_up_front_and_changes_nothing(packed, ids):
    peft_model = get_peft_model(packed, LoraConfig(target_modules=["embed_tokens", *PROJECTIONS], r=4))
    _randomize_adapters(peft_model)
    embedding = peft_model.get_base_model().model.embed_tokens.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        before = peft_model(input_ids=ids).logits
    for merge in (peft_model.merge_and_unload, peft_model.merge_adapter):
        with pytest.raises(PackedMergeError, match="keep the adapter separate|Keep the adapter separate"):
            merge()
    assert torch.equal(peft_model.get_base_model().model.embed_tokens.get_base_layer().weight, embedding)
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, before)
    base = peft_model.unload()  # dropping the adapter (no merge) is fine
    assert all(type(m) is PackedBitLinear for n, m in base.named_modules() if n.endswith(PROJECTIONS))


def test_merge_on_a_master_base_adds_the_update_to_the_master_weights_that_bitlinear_requantizes(checkpoints, ids):
    master = BitNetForCausalLM.from_pretrained(checkpoints["master"]).eval()
    reference = copy.deepcopy(master)
    peft_model = get_peft_model(master, LoraConfig(target_modules="all-linear", r=4, lora_alpha=64))
    _randomize_adapters(peft_model, scale=0.1)
    with torch.no_grad():
        for name, layer in _adapted(peft_model).items():
            delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
            reference.get_submodule(name).weight.add_(delta)
        unmerged = peft_model(input_ids=ids).logits
    merged = peft_model.merge_and_unload()
    assert all(type(merged.get_submodule(n)) is BitLinear for n in _projection_names())
    with torch.no_grad():
        for name in _projection_names():
            assert torch.equal(merged.get_submodule(name).weight, reference.get_submodule(name).weight)
        merged_logits = merged(input_ids=ids).logits
        # What BitLinear computes from the merged master weights (re-quantized to ternary in its forward) ...
        assert torch.equal(merged_logits, reference(input_ids=ids).logits)
    # ... which differs from the unmerged adapter (float, next to the quantized layer) by the re-quantization only.
    assert not torch.equal(merged_logits, unmerged)


# -- the hooks themselves ----------------------------------------------------------------------------------------


def test_peft_hooks_are_installed_once_and_leave_models_without_packed_layers_alone():
    from peft.tuners import tuners_utils
    from peft.tuners.lora.model import LoraModel

    from bitnet_torch.nn.lora_layers import register_peft_support

    hooks = (tuners_utils._maybe_include_all_linear_layers, LoraModel._create_new_module, LoraModel._check_merge_allowed)
    assert register_peft_support() and register_peft_support()
    assert hooks == (
        tuners_utils._maybe_include_all_linear_layers, LoraModel._create_new_module, LoraModel._check_merge_allowed
    )
    assert not hasattr(tuners_utils._maybe_include_all_linear_layers.__wrapped__, "__wrapped__")

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.b(self.a(x))

    config = LoraConfig(target_modules="all-linear", r=2)
    peft_model = get_peft_model(Plain(), config)
    assert config._custom_modules is None
    assert {n for n, m in peft_model.named_modules() if isinstance(m, LoraLinear)} == {
        "base_model.model.a", "base_model.model.b"
    }
    assert all(type(m) is LoraLinear for m in peft_model.modules() if isinstance(m, LoraLinear))
    merged = peft_model.merge_and_unload()
    assert isinstance(merged.a, nn.Linear) and not isinstance(merged.a, LoraLinear)


def test_transformers_add_set_and_delete_adapter_on_a_packed_model(packed, ids):
    with torch.no_grad():
        base_logits = packed(input_ids=ids).logits
    packed.add_adapter(LoraConfig(target_modules="all-linear", r=4, init_lora_weights=False), adapter_name="one")
    packed.add_adapter(LoraConfig(target_modules="all-linear", r=2, init_lora_weights=False), adapter_name="two")
    assert set(_adapted(packed)) == _projection_names()
    assert packed.active_adapters() == ["two"]
    packed.set_adapter("one")
    assert packed.active_adapters() == ["one"]
    with torch.no_grad():
        assert not torch.equal(packed(input_ids=ids).logits, base_logits)
    packed.delete_adapter(["one", "two"])
    assert not _adapted(packed) or all(not m.lora_A for m in _adapted(packed).values())
    with torch.no_grad():
        assert torch.equal(packed(input_ids=ids).logits, base_logits)
