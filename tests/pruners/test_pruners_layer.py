"""One nn.Linear at a time: magnitude, Wanda and SparseGPT against formulas and the reference solver (fp32)."""

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.reference import reference_fasterprune, reference_hessian, reference_wanda_variant
from pruners import CholeskyError, MagnitudePruner, SparseGPTPruner, WandaPruner, parse_pattern
from pruners.sparsegpt import inverse_cholesky_upper
from pruners.wanda import variant_mask, wanda_score


def make_layer(rows, cols, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(cols, rows, bias=False)
    return layer


def make_inputs(cols, samples=16, tokens=32, seed=1, outliers=(3, 17)):
    """(samples, tokens, cols) with a few large input channels, as real LLM activations have."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, tokens, cols, generator=generator)
    inputs *= torch.rand(cols, generator=generator) + 0.2
    for channel in outliers:
        inputs[..., channel] *= 50
    return inputs


def correlated_inputs(cols, samples=24, outlier_scale=20.0, seed=5):
    """Inputs whose channels are correlated (as real activations are), so an OBS weight update pays off."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.eye(cols) + torch.randn(cols, cols, generator=generator) / cols**0.5
    inputs = make_inputs(cols, samples=samples, outliers=()) @ mixing
    inputs[..., [3, 17]] *= outlier_scale
    return inputs


def observe(pruner, inputs):
    for sample in inputs:  # one sequence per call, as the references do
        pruner.add_batch(sample.unsqueeze(0))


def zeros(layer):
    return (layer.weight.detach() == 0).numpy()


def output_error(weight, pruned, inputs):
    x = inputs.reshape(-1, inputs.shape[-1])
    return float((x @ weight.t() - x @ pruned.t()).norm())


# ----------------------------------------------------------------------------------------------------------------
# magnitude


def test_magnitude_unstructured_is_one_threshold_per_matrix():
    layer = make_layer(48, 96)
    absolute = layer.weight.detach().abs().numpy().copy()
    report = MagnitudePruner(layer, "lin").prune(parse_pattern("unstructured", 0.6))
    threshold = np.sort(absolute.ravel())[int(absolute.size * 0.6)]
    assert np.array_equal(zeros(layer), absolute <= threshold)
    assert report.sparsity == (int(absolute.size * 0.6) + 1) / absolute.size
    assert report.error is None and report.damping is None


def test_magnitude_nm_per_row_groups():
    layer = make_layer(8, 32)
    absolute = layer.weight.detach().abs().numpy().copy()
    MagnitudePruner(layer, "lin").prune(parse_pattern("2:4"))
    expected = np.zeros_like(absolute, dtype=bool)
    for row in range(8):
        for start in range(0, 32, 4):
            expected[row, start + np.argsort(absolute[row, start:start + 4])[:2]] = True
    assert np.array_equal(zeros(layer), expected)


def test_magnitude_is_idempotent():
    layer = make_layer(32, 64)
    pattern = parse_pattern("unstructured", 0.5)
    MagnitudePruner(layer, "lin").prune(pattern)
    first = layer.weight.detach().clone()
    MagnitudePruner(layer, "lin").prune(pattern)
    assert torch.equal(first, layer.weight)


# ----------------------------------------------------------------------------------------------------------------
# wanda


def wanda_formula_mask(weight, inputs, sparsity):
    """|W_ij| * ||X_j||_2 over every token; per row, the int(c*s) smallest (stable argsort)."""
    norms = np.sqrt((inputs.reshape(-1, inputs.shape[-1]).double().numpy() ** 2).sum(axis=0))
    metric = np.abs(weight.double().numpy()) * norms[None, :]
    count = int(weight.shape[1] * sparsity)
    mask = np.zeros(metric.shape, dtype=bool)
    for row in range(metric.shape[0]):
        mask[row, np.argsort(metric[row], kind="stable")[:count]] = True
    return mask


@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.75])
def test_wanda_unstructured_equals_formula_with_exact_row_counts(sparsity):
    layer, inputs = make_layer(40, 96), make_inputs(96)
    weight = layer.weight.detach().clone()
    pruner = WandaPruner(layer, "lin")
    observe(pruner, inputs)
    pruner.prune(parse_pattern("unstructured", sparsity))
    assert np.array_equal(zeros(layer), wanda_formula_mask(weight, inputs, sparsity))
    assert (zeros(layer).sum(axis=1) == int(96 * sparsity)).all()
    # outlier channels make Wanda differ from magnitude
    magnitude = make_layer(40, 96)
    MagnitudePruner(magnitude, "lin").prune(parse_pattern("unstructured", sparsity))
    assert (zeros(layer) != zeros(magnitude)).sum() > 100


def test_wanda_statistics_match_reference_scaler_row():
    layer, inputs = make_layer(8, 24), make_inputs(24, samples=5, outliers=())
    pruner = WandaPruner(layer, "lin")
    observe(pruner, inputs)
    expected = (inputs.reshape(-1, 24) ** 2).sum(0) / 5  # (1/N_seq) * sum over tokens of x_j^2
    assert torch.allclose(pruner.scaler_row, expected, rtol=1e-5)
    assert pruner.nsamples == 5


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_wanda_nm_groups_valid_and_equal_formula(n, m):
    layer, inputs = make_layer(24, 64), make_inputs(64)
    weight = layer.weight.detach().clone()
    pruner = WandaPruner(layer, "lin")
    observe(pruner, inputs)
    pruner.prune(parse_pattern(f"{n}:{m}"))
    norms = (inputs.reshape(-1, 64).double() ** 2).sum(0).sqrt().numpy()
    metric = np.abs(weight.double().numpy()) * norms
    expected = np.zeros(metric.shape, dtype=bool)
    for row in range(24):
        for start in range(0, 64, m):
            expected[row, start + np.argsort(metric[row, start:start + m])[:n]] = True
    assert np.array_equal(zeros(layer), expected)
    assert (zeros(layer).reshape(24, -1, m).sum(-1) == n).all()


def test_wanda_variant_equals_reference_loop():
    layer, inputs = make_layer(32, 128), make_inputs(128)
    pruner = WandaPruner(layer, "lin", use_variant=True)
    observe(pruner, inputs)
    score = wanda_score(layer.weight.detach(), pruner.scaler_row)
    expected = reference_wanda_variant(score, 0.5)
    pruner.prune(parse_pattern("unstructured", 0.5))
    assert torch.equal(layer.weight == 0, expected)
    assert abs(float(expected.float().mean()) - 0.5) <= 0.0011
    assert len(set((layer.weight == 0).sum(1).tolist())) > 1  # rows differ, unlike the default rule


def test_wanda_variant_row_with_nothing_under_alpha_prunes_nothing():
    """Row 0 is uniform: its smallest score is 1/4 of its total, so nothing of it fits under alpha < 0.25; row 1's
    three small scores fit under any alpha. alpha 0.4 prunes 7 of 8 (row 0's four ties and row 1's three), the
    bisection halves to alpha 0.2, which gives the target 3 of 8: row 0 keeps every weight (the reference would
    gather at position -1 there and prune the whole row)."""
    score = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.01, 0.01, 0.01, 100.0]])
    mask = variant_mask(score, 0.375)
    assert mask.tolist() == [[False, False, False, False], [True, True, True, False]]


# ----------------------------------------------------------------------------------------------------------------
# sparsegpt


def run_sparsegpt(rows, cols, pattern, inputs=None, dead=()):
    layer = make_layer(rows, cols)
    if inputs is None:
        inputs = make_inputs(cols)
    inputs = inputs.clone()
    for channel in dead:
        inputs[..., channel] = 0
    weight = layer.weight.detach().clone()
    pruner = SparseGPTPruner(layer, "lin")
    observe(pruner, inputs)
    hessian = pruner.hessian.clone()
    report = pruner.prune(pattern)
    return layer, weight, hessian, inputs, report


@pytest.mark.parametrize(
    ("cols", "pattern", "sparsity", "dead"),
    [
        (256, "unstructured", 0.5, ()),
        (256, "2:4", None, ()),
        (256, "4:8", None, ()),
        (200, "unstructured", 0.5, ()),
        (200, "2:4", None, ()),
        (192, "1:4", None, ()),
        (256, "unstructured", 0.5, (5, 130)),
        (160, "unstructured", 0.3, ()),
    ],
)
def test_sparsegpt_equals_reference_solver(cols, pattern, sparsity, dead):
    parsed = parse_pattern(pattern, sparsity)
    layer, weight, hessian, inputs, report = run_sparsegpt(64, cols, parsed, dead=dead)
    assert torch.allclose(hessian, reference_hessian(inputs), rtol=1e-5, atol=1e-4 * float(hessian.abs().max()))
    expected, losses = reference_fasterprune(
        weight, reference_hessian(inputs), parsed.sparsity,
        prunen=parsed.n or 0, prunem=parsed.m or 0,
    )
    assert torch.equal(layer.weight == 0, expected == 0)
    scale = float(expected.abs().max())
    assert float((layer.weight.detach() - expected).abs().max()) <= 1e-5 * scale
    assert report.error == pytest.approx(float(losses.sum()), rel=1e-4)
    assert report.damping == 0.01
    for channel in dead:
        assert (layer.weight[:, channel] == 0).all()


def test_sparsegpt_unstructured_zero_count_per_block():
    layer, _, _, _, report = run_sparsegpt(128, 128, parse_pattern("unstructured", 0.5))
    assert int((layer.weight == 0).sum()) == 8193  # the spec's example: int(16384*0.5)+1, not 8192
    assert report.sparsity == 8193 / 16384
    layer, _, _, _, report = run_sparsegpt(128, 256, parse_pattern("unstructured", 0.5))
    assert int((layer.weight == 0).sum()) == 2 * 8193  # int(128*128*0.5)+1 per 128-column block
    layer, _, _, _, _ = run_sparsegpt(64, 200, parse_pattern("unstructured", 0.5))
    assert int((layer.weight == 0).sum()) == (int(64 * 128 * 0.5) + 1) + (int(64 * 72 * 0.5) + 1)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(pattern):
    parsed = parse_pattern(pattern, 0.5)
    inputs = correlated_inputs(128)
    errors = {}
    for name, pruner_class in [("magnitude", MagnitudePruner), ("wanda", WandaPruner),
                               ("sparsegpt", SparseGPTPruner)]:
        layer = make_layer(64, 128)
        weight = layer.weight.detach().clone()
        pruner = pruner_class(layer, "lin")
        observe(pruner, inputs)
        pruner.prune(parsed)
        errors[name] = output_error(weight, layer.weight.detach(), inputs)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]


def test_sparsegpt_casts_back_to_layer_dtype():
    layer = make_layer(32, 128).to(torch.bfloat16)
    pruner = SparseGPTPruner(layer, "lin")
    observe(pruner, make_inputs(128).to(torch.bfloat16))
    assert pruner.hessian.dtype == torch.float32
    pruner.prune(parse_pattern("2:4"))
    assert layer.weight.dtype == torch.bfloat16
    assert ((layer.weight == 0).reshape(32, -1, 4).sum(-1) == 2).all()


def test_cholesky_retries_with_more_damping_then_fails():
    generator = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(32, 32, generator=generator))
    eigenvalues = torch.ones(32)
    eigenvalues[0] = -0.05  # 1% damping leaves it indefinite, 10% does not
    hessian = basis @ torch.diag(eigenvalues) @ basis.t()
    upper, damping = inverse_cholesky_upper(hessian.clone())
    assert damping == pytest.approx(0.1)
    damped = hessian + 0.1 * hessian.diagonal().mean() * torch.eye(32)
    assert torch.allclose(upper.t() @ upper, torch.linalg.inv(damped), atol=1e-4)
    layer = make_layer(8, 32)
    pruner = SparseGPTPruner(layer, "model.layers.3.mlp.up_proj")
    pruner.hessian = torch.full((32, 32), float("nan"))
    pruner.nsamples = 1
    with pytest.raises(CholeskyError, match=r"model\.layers\.3\.mlp\.up_proj") as caught:
        pruner.prune(parse_pattern("unstructured", 0.5))
    assert isinstance(caught.value, RuntimeError)
