"""BitLinear (QAT): forward = SPEC §1, STE gradients = the detach formulation, int8 saved activations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitnet_torch
from bitnet_torch import BitLinear
from spec_reference import ref_bitlinear, ref_quantize_activation, ref_quantize_weight


def detach_formulation(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, lam: float = 1.0) -> torch.Tensor:
    """SPEC §2: F.linear(x + λ(Q(x) - x).detach(), W + λ(Q(W) - W).detach()) in x's dtype."""
    x_q, x_s = ref_quantize_activation(x)
    w_t, w_s = ref_quantize_weight(w)
    xq = (x_q.float() * x_s).to(x.dtype)
    wq = (w_t.float() * w_s).to(w.dtype)
    x_eff = x + (lam * (xq - x)).detach()
    w_eff = w + (lam * (wq - w)).detach()
    return F.linear(x_eff, w_eff.to(x.dtype), None if bias is None else bias.to(x.dtype))


def test_bitlinear_is_an_nn_linear_with_its_constructor():
    layer = BitLinear(16, 8, bias=False)
    assert isinstance(layer, nn.Linear)
    assert layer.weight.shape == (8, 16) and layer.bias is None


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(5, 64), (2, 7, 64), (2, 3, 4, 64), (0, 64)])
def test_forward_matches_spec(bias, shape):
    layer = BitLinear(64, 24, bias=bias)
    x = torch.randn(shape)
    y = layer(x)
    assert y.shape == shape[:-1] + (24,) and y.dtype == torch.float32
    ref = ref_bitlinear(x, layer.weight.detach(), None if layer.bias is None else layer.bias.detach())
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("in_features", [1, 2, 3])
def test_forward_matches_spec_for_tiny_k(in_features):
    layer = BitLinear(in_features, 12, bias=False)
    x = torch.randn(5, in_features)
    torch.testing.assert_close(layer(x).double(), ref_bitlinear(x, layer.weight.detach()), rtol=1e-6, atol=1e-6)


def test_forward_all_zero_tokens_are_finite():
    layer = BitLinear(32, 8, bias=True)
    x = torch.zeros(3, 32)
    y = layer(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, layer.bias.detach().expand(3, 8))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(6, 48), (2, 5, 48)])
def test_gradients_equal_detach_formulation_fp32(bias, shape):
    torch.manual_seed(1)
    layer = BitLinear(48, 20, bias=bias)
    x = torch.randn(shape, requires_grad=True)
    grad_out = torch.randn(shape[:-1] + (20,))
    (layer(x) * grad_out).sum().backward()

    w = layer.weight.detach().clone().requires_grad_(True)
    b = None if layer.bias is None else layer.bias.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    (detach_formulation(x2, w, b) * grad_out).sum().backward()

    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(layer.bias.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_gradients_equal_detach_formulation_bf16_3d():
    torch.manual_seed(2)
    layer = BitLinear(64, 32, bias=False)
    x = torch.randn(2, 9, 64, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    grad_out = torch.randn(2, 9, 32, dtype=torch.bfloat16)
    (y.float() * grad_out.float()).sum().backward()

    # Reference: the detach formulation evaluated in fp32 on the same (bf16-valued) input.
    w = layer.weight.detach().clone().requires_grad_(True)
    x2 = x.detach().float().requires_grad_(True)
    (detach_formulation(x2, w, None) * grad_out.float()).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), x2.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.75])
def test_lambda_warmup_blends_like_spec(lam):
    layer = BitLinear(32, 16, bias=True, lambda_=lam)
    x = torch.randn(4, 32, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    w = layer.weight.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    ref = detach_formulation(x2, w, layer.bias.detach(), lam)
    ref.sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-5, atol=1e-5)
    if lam == 0.0:
        torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias))


def test_set_lambda_validates_and_model_helper_sets_all():
    model = nn.Sequential(BitLinear(8, 8), nn.ReLU(), BitLinear(8, 4))
    assert bitnet_torch.set_lambda(model, 0.25) == 2
    assert all(m.lambda_ == 0.25 for m in model if isinstance(m, BitLinear))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model[0].set_lambda(1.5)


def test_weight_only_quantization():
    layer = BitLinear(32, 8, act_bits=None)
    x = torch.randn(3, 32)
    w_t, w_s = ref_quantize_weight(layer.weight.detach())
    torch.testing.assert_close(layer(x), F.linear(x, w_t.float() * w_s, layer.bias), rtol=1e-6, atol=1e-6)


def test_input_rms_norm_option():
    layer = BitLinear(32, 8, use_rms_norm=True, rms_norm_eps=1e-6)
    x = torch.randn(3, 32) * 5
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(layer(x).double(), ref_bitlinear(normed, layer.weight.detach(), layer.bias.detach()), rtol=1e-5, atol=1e-5)


def test_rejects_wrong_feature_size_and_bad_options():
    with pytest.raises(ValueError, match="last dimension 16"):
        BitLinear(16, 8)(torch.randn(2, 15))
    with pytest.raises(ValueError, match="bits"):
        BitLinear(16, 8, act_bits=9)


def _saved_activation_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward, excluding parameters (which exist anyway)."""
    param_ptrs = {p.data_ptr() for p in module.parameters()}
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        if t.data_ptr() not in param_ptrs:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum()
    return total


def test_saves_int8_activations_not_float_input():
    x = torch.randn(4, 128, 256, requires_grad=True)
    linear = nn.Linear(256, 256, bias=False)
    bit = BitLinear(256, 256, bias=False)
    dense_bytes = _saved_activation_bytes(linear, x)
    bit_bytes = _saved_activation_bytes(bit, x)
    assert dense_bytes == x.numel() * 4
    # int8 codes (1 byte/element) + one fp32 scale per token + the 0-dim fp32 weight scale
    assert bit_bytes == x.numel() + 4 * 128 * 4 + 4
    assert bit_bytes < dense_bytes / 3.5


def test_compiled_forward_and_backward_match_eager():
    torch.manual_seed(3)
    layer = BitLinear(64, 32, bias=True)
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    eager_grads = (x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone())
    x.grad = None
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True)  # fullgraph: any host sync (.item()) would break the graph
    y2 = compiled(x)
    y2.square().sum().backward()
    torch.testing.assert_close(y2, y)
    for got, want in zip((x.grad, layer.weight.grad, layer.bias.grad), eager_grads):
        torch.testing.assert_close(got, want)


def test_tiny_bitlinear_model_learns():
    torch.manual_seed(4)
    teacher = nn.Linear(16, 4)
    x = torch.randn(512, 16)
    target = teacher(x).argmax(-1)
    model = nn.Sequential(BitLinear(16, 64), nn.ReLU(), BitLinear(64, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = F.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], f"loss did not fall enough: {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_convert_to_bitnet_keeps_pretrained_weights():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    model = LlamaForCausalLM(config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bitnet_torch.convert_to_bitnet(model, exclude=("lm_head",))
    converted = [n for n, m in model.named_modules() if isinstance(m, BitLinear)]
    assert len(converted) == 2 * 7
    assert not isinstance(model.lm_head, BitLinear) and isinstance(model.lm_head, nn.Linear)
    after = dict(model.named_parameters())
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed during conversion"
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    out = model(torch.randint(0, 64, (2, 7)), labels=torch.randint(0, 64, (2, 7)))
    out.loss.backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None
