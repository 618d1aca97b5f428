"""The masked-LoRA layer's custom backward: the same numbers as the plain autograd form it replaced, and no
out×in float tensor saved for backward (the memory it exists to save)."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import magnitude_mask
from torch import nn

from spp_cli.adapters.masked_lora import MaskedLoRAConfig, MaskedLoRALinear

OUT, IN, TOKENS = 48, 40, 30


def autograd_reference(layer: MaskedLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The previous forward, differentiated by autograd: y = x Wᵀ + b + s·D(x) ((B A) ⊙ M)ᵀ, Δ kept in the graph."""
    result = layer.base(x)
    xd = F.dropout(x, layer.dropout_p, layer.training) if layer.dropout_p > 0 else x
    delta = (layer.lora_B @ layer.lora_A) * layer.support
    return result + (F.linear(xd.to(delta.dtype), delta) * layer.scale).to(result.dtype)


def trained_layer(dropout: float) -> MaskedLoRALinear:
    """A 50%-pruned layer whose B is non-zero (as after some training), so every gradient path is exercised."""
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    with torch.no_grad():
        base.weight[magnitude_mask(base.weight, "unstructured")] = 0
    layer = MaskedLoRALinear(base, MaskedLoRAConfig(r=4, lora_alpha=8, dropout=dropout))
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
    return layer.train()


def gradients(layer: MaskedLoRALinear, forward, x: torch.Tensor, weights: torch.Tensor):
    """(y, ∂x, ∂A, ∂B) for the loss Σ y ⊙ weights, dropout drawn from the same seed."""
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    y = forward(x)
    (y * weights).sum().backward()
    return y.detach(), x.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_custom_backward_equals_autograd_of_the_plain_form(dropout):
    layer = trained_layer(dropout)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, TOKENS // 3, IN, generator=generator)
    weights = torch.randn(3, TOKENS // 3, OUT, generator=generator)
    ours = gradients(layer, layer, x, weights)
    reference = gradients(layer, lambda inputs: autograd_reference(layer, inputs), x, weights)
    for got, want in zip(ours, reference, strict=True):
        assert got.shape == want.shape
        assert float((got - want).abs().max()) <= 1e-6 * max(1.0, float(want.abs().max()))
    assert float(ours[2].abs().max()) > 1e-3 and float(ours[3].abs().max()) > 1e-3  # gradients that move


def test_the_gradient_of_b_a_is_masked_to_the_support():
    """∂B and ∂A come from P ⊙ M: an entry outside the support contributes nothing to them."""
    layer = trained_layer(0.0)
    x = torch.randn(TOKENS, IN, generator=torch.Generator().manual_seed(4))
    weights = torch.randn(TOKENS, OUT, generator=torch.Generator().manual_seed(5))
    _, _, grad_A, grad_B = gradients(layer, layer, x, weights)
    p = (weights.t() @ x) * layer.support * layer.scale  # ∂L/∂(B A), masked, (out, in)
    assert torch.allclose(grad_A, layer.lora_B.detach().t() @ p, rtol=0, atol=1e-5)
    assert torch.allclose(grad_B, p @ layer.lora_A.detach().t(), rtol=0, atol=1e-5)


def out_by_in_floats_saved(forward, layer: MaskedLoRALinear, x: torch.Tensor) -> int:
    """How many out×in float tensors (or their transposes) autograd saves for backward during `forward(x)`,
    other than the frozen W itself (the module's own weight, resident anyway)."""
    count = 0

    def pack(tensor):
        nonlocal count
        if (tensor.numel() == OUT * IN and tensor.dtype.is_floating_point
                and tensor.data_ptr() != layer.base.weight.data_ptr()):
            count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward(x.requires_grad_(True)).sum()
    return count


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_no_out_by_in_float_tensor_is_kept_for_backward(dropout):
    layer = trained_layer(dropout)
    x = torch.randn(TOKENS, IN)
    assert out_by_in_floats_saved(layer, layer, x.clone()) == 0
    # what the plain form kept, Δ for ∂xd (so this test can fail)
    assert out_by_in_floats_saved(lambda t: autograd_reference(layer, t), layer, x.clone()) == 1
