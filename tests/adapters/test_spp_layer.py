"""The SPP layer (spec/spp-method.md §1): initial identity, forward variants against the naive reference,
merge exactness and zero preservation."""

import math

import pytest
import torch
from tiny_models import (
    batch_ids,
    decoder_linears,
    magnitude_mask,
    pruned_tiny_llama,
    randomize_adapters,
    relative_error,
    tiny_llama,
)
from torch import nn

from spp_cli.adapters.base import default_targets
from spp_cli.adapters.spp import (
    SPPConfig,
    SPPLinear,
    delta_weight,
    inject_spp,
    merge_spp,
    merged_weight,
    repeat_groups,
    spp_layers,
)
from spp_cli.errors import BadInput
from spp_cli.io.manifest import zeros_sha256

# ---- the layer ----


def test_shapes_init_and_repeat_interleave_blocks():
    torch.manual_seed(0)
    layer = SPPLinear(nn.Linear(48, 64), SPPConfig())
    assert layer.spp_alpha.shape == (16, 48) and layer.spp_alpha.dtype == torch.float32
    assert layer.spp_beta.shape == (64,) and torch.count_nonzero(layer.spp_beta) == 0
    assert float(layer.spp_alpha.detach().abs().max()) <= 1 / math.sqrt(48)  # kaiming_uniform_(a=sqrt(5)) bound
    assert layer.scale == 2.0
    rep = repeat_groups(layer.spp_alpha, 64)
    for row in range(64):  # contiguous blocks of out/G = 4 rows share α row `row // 4` (not tiling)
        assert torch.equal(rep[row], layer.spp_alpha[row // 4])
    beta = torch.randn(64)
    w = layer.base.weight
    expected = torch.stack([w[i] * beta[i] * layer.spp_alpha[i // 4] for i in range(64)])
    assert torch.allclose(delta_weight(w, layer.spp_alpha, beta), expected, rtol=0, atol=1e-7)


def test_groups_must_divide_out_features():
    model = nn.Sequential(nn.Linear(8, 100))
    with pytest.raises(BadInput, match=r"layer 0 has out_features 100.*--groups 10"):
        inject_spp(model, ["0"], SPPConfig(groups=16))


def test_fused_needs_dropout_zero_and_unknown_variant():
    with pytest.raises(BadInput, match="--forward fused needs --dropout 0"):
        SPPLinear(nn.Linear(16, 16), SPPConfig(forward="fused", dropout=0.05))
    with pytest.raises(BadInput, match="--forward 'fast' is unknown"):
        SPPLinear(nn.Linear(16, 16), SPPConfig(forward="fast"))
    assert SPPConfig(dropout=0).resolved_forward() == "fused"
    assert SPPConfig().resolved_forward() == "recompute"


@pytest.mark.parametrize("variant,dropout", [("recompute", 0.0), ("recompute", 0.2), ("fused", 0.0)])
def test_variant_equals_naive_outputs_and_grads(variant, dropout):
    """fp32: output, ∂x, ∂α, ∂β of every variant equal the naive reference's (same dropout RNG seed)."""
    torch.manual_seed(0)
    base = nn.Linear(96, 64)
    base.weight.data[magnitude_mask(base.weight.data, "2:4")] = 0
    x0 = torch.randn(3, 7, 96)
    probe = torch.randn(3, 7, 64)
    results = {}
    for name in ("naive", variant):
        torch.manual_seed(1)
        layer = SPPLinear(base, SPPConfig(forward=name, dropout=dropout))
        randomize_adapters(nn.Sequential(layer))
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(7)
        y = layer(x)
        (y * probe).sum().backward()
        results[name] = (y.detach(), x.grad, layer.spp_alpha.grad, layer.spp_beta.grad)
    for got, want in zip(results[variant], results["naive"], strict=True):
        assert relative_error(got, want) < 2e-6


def test_model_level_variant_grads_match_naive():
    """Whole tiny LLaMA (7 projections × 2 layers): ∂α, ∂β of the default equal naive's within 1e-5 relative."""
    grads = {}
    for variant in ("naive", "recompute"):
        model = pruned_tiny_llama()
        inject_spp(model, decoder_linears(model), SPPConfig(forward=variant, dropout=0.1))
        randomize_adapters(model)
        model.train()
        torch.manual_seed(5)
        ids = batch_ids()
        model(input_ids=ids, labels=ids).loss.backward()
        grads[variant] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["naive"].keys() == grads["recompute"].keys() and len(grads["naive"]) == 28
    for name, want in grads["naive"].items():
        assert relative_error(grads["recompute"][name], want) < 1e-5, name


@pytest.mark.parametrize("variant", ["naive", "recompute", "fused"])
def test_initial_logits_equal_pruned_model_exactly(variant):
    pruned = pruned_tiny_llama().eval()
    adapted = pruned_tiny_llama().eval()
    layers = inject_spp(adapted, decoder_linears(adapted),
                        SPPConfig(forward=variant, dropout=0.0 if variant == "fused" else 0.05))
    assert len(layers) == 14
    ids = batch_ids()
    with torch.no_grad():
        assert torch.equal(adapted(input_ids=ids).logits, pruned(input_ids=ids).logits)


def test_inject_freezes_everything_but_spp_parameters():
    model = pruned_tiny_llama()
    inject_spp(model, ["q_proj", "down_proj"], SPPConfig())  # PEFT-style suffixes resolve to full names
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all(n.rsplit(".", 1)[1] in ("spp_alpha", "spp_beta") for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * (16 * 64 + 64) + 2 * (16 * 128 + 64)
    with pytest.raises(BadInput, match="not in the model"):
        inject_spp(model, ["no_such_proj"], SPPConfig())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_merge_equals_adapted_and_keeps_every_zero(pattern):
    model = pruned_tiny_llama(pattern)
    names = decoder_linears(model)
    zeros_before = {n: zeros_sha256(model.get_submodule(n).weight) for n in names}
    inject_spp(model, names, SPPConfig())
    randomize_adapters(model)
    model.eval()
    ids = batch_ids()
    with torch.no_grad():
        adapted_logits = model(input_ids=ids).logits
        merge_spp(model)
        merged_logits = model(input_ids=ids).logits
    assert not spp_layers(model) and all(type(model.get_submodule(n)) is nn.Linear for n in names)
    assert relative_error(merged_logits, adapted_logits) < 1e-5
    assert {n: zeros_sha256(model.get_submodule(n).weight) for n in names} == zeros_before
    if pattern != "unstructured":
        n, m = map(int, pattern.split(":"))
        for name in names:
            zeros_per_group = (model.get_submodule(name).weight == 0).reshape(-1, m).sum(1)
            assert int(zeros_per_group.min()) >= n


def test_merged_weight_formula_in_fp32_cast_back():
    torch.manual_seed(0)
    weight = torch.randn(32, 16).to(torch.bfloat16)
    weight[weight.abs() < 0.5] = 0
    alpha, beta = torch.randn(16, 16), torch.randn(32)
    merged = merged_weight(weight, alpha, beta, 2.0)
    expected = (weight.float() * (1 + 2.0 * beta[:, None] * repeat_groups(alpha, 32))).to(torch.bfloat16)
    assert merged.dtype == torch.bfloat16 and torch.equal(merged, expected)
    assert torch.equal(merged == 0, weight == 0)


def test_default_targets_from_manifest_or_zeros():
    model = pruned_tiny_llama()
    assert default_targets(model, {"layers": {"model.layers.0.mlp.up_proj": {}}}) == ["model.layers.0.mlp.up_proj"]
    assert default_targets(model, None) == decoder_linears(model)
    with pytest.raises(BadInput, match="nothing to preserve"):
        default_targets(tiny_llama(), None)


@pytest.mark.parametrize("variant", ["recompute", "fused"])
def test_autocast_bf16_runs_in_bf16_with_fp32_grads(variant):
    """Under autocast (as Trainer's bf16 on GPU; CPU autocast here) the custom functions compute in bf16 and give
    fp32 gradients close to the naive reference's."""
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    x0 = torch.randn(4, 64)
    grads = {}
    for name in ("naive", variant):
        torch.manual_seed(1)
        layer = SPPLinear(base, SPPConfig(forward=name, dropout=0.0))
        randomize_adapters(nn.Sequential(layer))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x0)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        assert layer.spp_alpha.grad.dtype == layer.spp_beta.grad.dtype == torch.float32
        grads[name] = (layer.spp_alpha.grad, layer.spp_beta.grad)
    for got, want in zip(grads[variant], grads["naive"], strict=True):
        assert relative_error(got, want) < 0.05  # bf16 round-off
