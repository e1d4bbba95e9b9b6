"""LoRA on BitNet models with peft: BitLinear targets, the packed-base LoRA layer, merging into master weights."""

from __future__ import annotations

import copy

import pytest
import torch
from peft.tuners.lora.layer import Linear as LoraLinear

import bitnet_torch
from bitnet_torch.models import BitNetConfig, BitNetForCausalLM
from bitnet_torch.training import (
    PackedBitLinearLoraLayer,
    PackedMergeError,
    apply_lora,
    bitnet_lora_config,
    load_adapter,
    merge_lora_into_master,
)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def master_model() -> BitNetForCausalLM:
    torch.manual_seed(0)
    config = BitNetConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1,
    )
    return BitNetForCausalLM(config).eval()


@pytest.fixture()
def ids() -> torch.Tensor:
    return torch.randint(2, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def _randomize_adapters(model, scale: float = 0.05, seed: int = 2) -> None:
    """Give lora_B non-zero values (peft initialises it to zero, which would make every comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_lora_wraps_every_bitlinear_projection_and_only_adapters_get_grads(master_model, ids):
    peft_model = apply_lora(copy.deepcopy(master_model), bitnet_lora_config(r=4))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if isinstance(m, LoraLinear)}
    assert wrapped == set(PROJECTIONS)
    for module in peft_model.modules():
        if isinstance(module, LoraLinear):
            assert isinstance(module.get_base_layer(), bitnet_torch.BitLinear)
    _randomize_adapters(peft_model)
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert all(not p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)
    assert len(with_grad) == 2 * len(PROJECTIONS) * 2  # A and B, 7 projections, 2 layers


def test_merge_into_master_keeps_bitlinear_and_equals_requantized_reference(master_model, ids):
    peft_model = apply_lora(copy.deepcopy(master_model), bitnet_lora_config(r=4, lora_alpha=64))
    _randomize_adapters(peft_model, scale=0.1)
    # Reference: the same master weights plus scaling * B @ A, computed by hand.
    reference = copy.deepcopy(master_model)
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if isinstance(module, LoraLinear):
                target = reference.get_submodule(name.removeprefix("base_model.model."))
                delta = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
                target.weight.add_(delta)
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
        base = master_model(input_ids=ids).logits
    merged = merge_lora_into_master(peft_model)
    assert all(isinstance(m, bitnet_torch.BitLinear) for _, m in merged.model.projections())
    assert merged.config.quantization_config == master_model.config.quantization_config
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
        assert torch.equal(merged_logits, reference(input_ids=ids).logits), "merge must be W + scaling*B@A, re-quantized"
    # Within the quantization change: the adapter is large here, so the re-quantized merge must move the
    # logits in the adapter's direction (a merge that lost the adapter would give a cosine near 0).
    cosine = torch.nn.functional.cosine_similarity((merged_logits - base).flatten(), (unmerged - base).flatten(), dim=0)
    assert cosine > 0.3, f"merged model lost the adapter's effect (cosine {cosine:.3f})"


def test_packed_base_lora_matches_master_base_exactly_and_reloads(master_model, ids, tmp_path):
    master_peft = apply_lora(copy.deepcopy(master_model), bitnet_lora_config(r=4))
    _randomize_adapters(master_peft)
    packed_peft = apply_lora(bitnet_torch.pack_model(copy.deepcopy(master_model)), bitnet_lora_config(r=4))
    layers = [m for m in packed_peft.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == 2 * len(PROJECTIONS) and all(isinstance(m, PackedBitLinearLoraLayer) for m in layers)
    missing, unexpected = packed_peft.load_state_dict(
        {k: v for k, v in master_peft.state_dict().items() if "lora_" in k}, strict=False
    )
    assert not unexpected and not [k for k in missing if "lora_" in k]
    with torch.no_grad():
        expected = master_peft(input_ids=ids).logits
        got = packed_peft(input_ids=ids).logits
    assert torch.equal(got, expected), f"max diff {(got - expected).abs().max()}"

    # Layer level: y = packed(x) + lora_B(lora_A(x)) * scaling.
    layer = layers[0]
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        manual = layer.get_base_layer()(x) + layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
        assert torch.equal(layer(x), manual)

    packed_peft.save_pretrained(tmp_path / "adapter")
    reloaded = load_adapter(bitnet_torch.pack_model(copy.deepcopy(master_model)), str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, got)
    with pytest.raises(PackedMergeError, match="packed"):
        packed_peft.merge_and_unload()
    with pytest.raises(PackedMergeError, match="master"):
        merge_lora_into_master(packed_peft)


def test_packed_base_trains_only_the_adapter(master_model, ids):
    packed_peft = apply_lora(bitnet_torch.pack_model(copy.deepcopy(master_model)), bitnet_lora_config(r=4))
    packed_peft.train()
    packed_peft(input_ids=ids, labels=ids).loss.backward()
    with_grad = [n for n, p in packed_peft.named_parameters() if p.grad is not None]
    assert with_grad and all("lora_" in n for n in with_grad)


def test_packed_base_refuses_dora(master_model):
    with pytest.raises(ValueError, match="DoRA"):
        apply_lora(bitnet_torch.pack_model(copy.deepcopy(master_model)), bitnet_lora_config(r=4, use_dora=True))


# -- bitnet-torch finetune on a packed base (issue 15, item 16) ----------------------------------------------------


@pytest.fixture(scope="module")
def packed_checkpoint(tmp_path_factory):
    from test_gguf_helpers import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("finetune_packed")
    make_tiny_checkpoint(root / "packed-ckpt", form="packed", hidden_size=64, intermediate_size=128)
    return root


FINETUNE_TINY = ["--max-steps", "2", "--batch-size", "2", "--num-examples", "8", "--max-length", "64",
                 "--logging-steps", "1", "--sample-tokens", "4", "--disable-tqdm"]


@pytest.mark.slow
def test_finetune_packed_base_keeps_the_adapter_separate_by_default_and_records_an_absolute_base(
    packed_checkpoint, tmp_path, monkeypatch, capsys
):
    import json
    from pathlib import Path

    from peft import PeftModel

    from bitnet_torch.cli import main
    from peft_helpers import logits_of_adapter_in_a_fresh_process

    monkeypatch.chdir(packed_checkpoint)  # a relative model path, as a user types it
    code = main(["finetune", "packed-ckpt", "--base", "packed", "--output-dir", str(tmp_path / "ft"), *FINETUNE_TINY])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "packed base" in out and "merged" not in out
    adapter_dir = tmp_path / "ft" / "adapter"
    recorded = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(recorded).is_absolute() and Path(recorded) == (packed_checkpoint / "packed-ckpt").resolve()
    assert not (tmp_path / "ft" / "merged-master").exists()

    # Asked explicitly, a merge on a packed base is a clear error (before any training).
    code = main(["finetune", "packed-ckpt", "--base", "packed", "--merge", "--output-dir", str(tmp_path / "ft2"),
                 *FINETUNE_TINY])
    _, err = capsys.readouterr()
    assert code == 1 and "merge=True" in err and "packed base" in err and err.count("\n") == 1
    assert not (tmp_path / "ft2").exists()

    # From another directory, in a fresh process, offline: the base is found through the recorded path.
    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(5))
    reference = PeftModel.from_pretrained(BitNetForCausalLM.from_pretrained(recorded), adapter_dir).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    assert torch.equal(logits_of_adapter_in_a_fresh_process(adapter_dir, ids, tmp_path), expected)
