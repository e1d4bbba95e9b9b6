"""PackedBitLinear: Microsoft's packed state, both scale conventions, parity with BitLinear and Transformers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bitnet_torch
from bitnet_torch import BitLinear, PackedBitLinear
from spec_reference import ref_bitlinear, ref_pack, ref_quantize_weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_holds_only_microsoft_state(dtype):
    layer = BitLinear(40, 12, bias=False, dtype=dtype)
    packed = layer.pack()
    state = packed.state_dict()
    assert set(state) == {"weight", "weight_scale"}
    assert state["weight"].dtype == torch.uint8 and state["weight"].shape == (3, 40)
    assert state["weight_scale"].dtype == dtype and state["weight_scale"].shape == (1,)
    assert not any(p.is_floating_point() and p.numel() > 1 for p in packed.parameters())
    w_t, scale = ref_quantize_weight(layer.weight.detach())
    assert torch.equal(state["weight"], ref_pack(w_t))
    assert state["weight_scale"].float().item() == pytest.approx(scale.to(dtype).float().item())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 64), (0, 64)])
def test_packed_twin_matches_bitlinear_eval(bias, shape):
    layer = BitLinear(64, 28, bias=bias).eval()
    packed = layer.pack()
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), layer(x), rtol=1e-6, atol=1e-6)


def test_packed_forward_matches_spec_in_bf16():
    layer = BitLinear(96, 16, bias=False)
    packed = layer.pack(scale_dtype=torch.float32)
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    y = packed(x)
    assert y.dtype == torch.bfloat16
    ref = ref_bitlinear(x, layer.weight.detach()).to(torch.bfloat16)
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2)


def test_divide_convention_gives_the_same_output():
    layer = BitLinear(32, 8, bias=True)
    multiply = layer.pack()
    divide = PackedBitLinear(32, 8, bias=True, scale_convention="divide")
    divide.load_state_dict({**multiply.state_dict(), "weight_scale": 1.0 / multiply.weight_scale})
    x = torch.randn(5, 32)
    torch.testing.assert_close(divide(x), multiply(x), rtol=1e-6, atol=1e-6)
    divide.to_multiply_convention()
    assert divide.scale_convention == "multiply"
    torch.testing.assert_close(divide.weight_scale, multiply.weight_scale)


def test_pack_model_replaces_every_bitlinear_and_drops_floats():
    model = nn.Sequential(BitLinear(16, 32), nn.ReLU(), BitLinear(32, 8, bias=False)).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = model(x)
    bitnet_torch.pack_model(model)
    assert isinstance(model[0], PackedBitLinear) and isinstance(model[2], PackedBitLinear)
    assert sum(p.numel() for p in model.parameters()) == 0
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)


def test_packed_layer_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 4"):
        PackedBitLinear(16, 6)
    with pytest.raises(ValueError, match="last dimension 16"):
        PackedBitLinear(16, 8)(torch.randn(2, 17))
    with pytest.raises(ValueError, match="scale_convention"):
        PackedBitLinear(16, 8, scale_convention="times")


def test_matches_transformers_autobitlinear_offline():
    from transformers.integrations.bitnet import AutoBitLinear

    ours = BitLinear(64, 32, bias=False).pack(scale_dtype=torch.float32)
    theirs = AutoBitLinear(64, 32, bias=False, dtype=torch.float32, online_quant=False)
    with torch.no_grad():
        theirs.weight.copy_(ours.ternary_weight().float())  # what Transformers unpacks at load time
        theirs.weight_scale.copy_(ours.weight_scale)
    x = torch.randn(2, 6, 64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_matches_transformers_bitlinear_divide_convention():
    from transformers.integrations.bitnet import BitLinear as HFBitLinear

    source = BitLinear(64, 32, bias=False).pack(scale_dtype=torch.float32)
    theirs = HFBitLinear(64, 32, bias=False, dtype=torch.float32)
    ours = PackedBitLinear(64, 32, bias=False, dtype=torch.float32, scale_convention="divide")
    with torch.no_grad():
        for module in (theirs, ours):
            module.weight.copy_(source.weight)
            module.weight_scale.copy_(1.0 / source.weight_scale)
    x = torch.randn(3, 64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_gradient_flows_through_a_frozen_packed_layer_like_bitlinear(bias):
    """LoRA on a packed base: dL/dx through the packed layer is the STE gradient dy @ (W_t * scale)."""
    layer = BitLinear(48, 16, bias=bias)
    packed = layer.pack(scale_dtype=torch.float32)
    x = torch.randn(2, 5, 48, requires_grad=True)
    grad_out = torch.randn(2, 5, 16)
    (packed(x) * grad_out).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (layer(x_ref) * grad_out).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert packed.weight.grad is None


def test_gradient_flows_through_int8_linear():
    from bitnet_torch import ops

    w = torch.randint(-127, 128, (12, 32), dtype=torch.int8)
    scale = torch.rand(12) * 0.01
    bias = torch.randn(12, requires_grad=True)
    x = torch.randn(3, 32, requires_grad=True)
    grad_out = torch.randn(3, 12)
    (ops.int8_linear(x, w, scale, bias) * grad_out).sum().backward()
    torch.testing.assert_close(x.grad, grad_out @ (w.float() * scale[:, None]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bias.grad, grad_out.sum(0))
