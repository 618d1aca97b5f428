"""OWL block sparsities (pruners/owl.py) against an independent transcription of luuyin/OWL's formula."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import random_model

from pruners import PatternError, parse_pattern
from pruners.owl import owl_sparsities
from pruners.sequential import (
    PruneOptions,
    PrunerOptionError,
    find_decoder_blocks,
    prunable_linears,
    prune_model,
)

VOCAB, SEQLEN, NSAMPLES, BLOCKS = 128, 16, 4, 4


def tiny_llama(seed=0):
    """Four random-init blocks; a few embedding columns x50 (outlier features) and block-dependent scales."""
    model = random_model("llama", seed, vocab_size=VOCAB, num_hidden_layers=BLOCKS, num_key_value_heads=2,
                         max_position_embeddings=64, attn_implementation="eager")
    with torch.no_grad():
        model.get_input_embeddings().weight[:, [3, 17, 40]] *= 50
        for index, block in enumerate(model.model.layers):  # make the blocks' outlier ratios differ clearly
            block.mlp.down_proj.weight[:, : 4 * index + 1] *= 8
    return model


def calibration(seed=0):
    return torch.randint(2, VOCAB, (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(seed))


def reference_owl(model, ids, sparsity, threshold, lam):
    """luuyin/OWL `prune_wanda_outlier`, transcribed in numpy float64 from a dense forward of the whole model."""
    inputs = {}
    linears = prunable_linears(model)
    hooks = [lin.register_forward_hook(lambda m, a, o, n=name: inputs.setdefault(n, []).append(a[0].detach()))
             for name, lin in linears.items()]
    with torch.no_grad():
        for row in range(ids.shape[0]):  # one sequence per forward, as the reference
            model(ids[row:row + 1])
    for hook in hooks:
        hook.remove()
    ratios = []
    for index in range(BLOCKS):
        metric = []
        for name, lin in linears.items():
            if name.startswith(f"model.layers.{index}."):
                x = torch.cat(inputs[name]).double().numpy().reshape(-1, lin.in_features)
                scaler_row = (x**2).sum(0) / ids.shape[0]
                metric.append((np.abs(lin.weight.detach().double().numpy()) * np.sqrt(scaler_row)).ravel())
        metric = np.concatenate(metric)
        ratios.append(100.0 * (metric > threshold * metric.mean()).sum() / metric.size)
    ratios = np.array(ratios)
    ratios = (ratios - ratios.min()) * (1 / (ratios.max() - ratios.min()) * lam * 2)
    ratios = ratios - np.mean(ratios) + (1 - sparsity)
    return 1 - ratios


def run(method, sparsity=0.5, lam=0.08, threshold=5.0, **options):
    model, blocks = tiny_llama(), []
    owl = PruneOptions(method, parse_pattern("unstructured", sparsity), sparsity_profile="owl",
                       owl_threshold=threshold, owl_lambda=lam, **options)
    reports = prune_model(model, calibration(), owl, on_block=blocks.append)
    return model, reports, blocks


def test_owl_block_sparsities_equal_the_reference_formula():
    model, _, blocks = run("wanda", sparsity=0.6)
    expected = reference_owl(tiny_llama(), calibration(), 0.6, 5.0, 0.08)
    got = np.array([b.sparsity for b in blocks])
    assert np.allclose(got, expected, atol=1e-9, rtol=0), (got, expected)
    assert abs(got.mean() - 0.6) < 1e-6
    assert abs((got.max() - got.min()) - 2 * 0.08) < 1e-9  # the reference's spread: 2 * lambda
    assert np.all(np.abs(got - 0.6) <= 2 * 0.08 + 1e-12)
    assert len(set(np.round(got, 9))) == BLOCKS  # four distinct ratios: the test is not the uniform case
    ratios = [b.outlier_ratio for b in blocks]
    assert all(0 < r < 100 for r in ratios)
    assert int(np.argmax(ratios)) == int(np.argmin(got))  # most outliers -> pruned least


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_every_layer_is_pruned_at_its_block_ratio(method):
    model, reports, blocks = run(method)
    by_block = {b.index: b.sparsity for b in blocks}
    assert sorted(by_block) == list(range(BLOCKS))
    for name, lin in prunable_linears(model).items():
        s = by_block[int(name.split(".")[2])]
        zeros = lin.weight.detach() == 0
        if method == "wanda":  # exactly int(c*s) per row
            assert (zeros.sum(1) == int(lin.in_features * s)).all(), name
        elif method == "magnitude":  # the `<=` rule: int(numel*s)+1 per matrix
            assert int(zeros.sum()) == int(lin.weight.numel() * s) + 1, name
        else:  # the `<=` rule per 128-column block
            for start in range(0, lin.in_features, 128):
                block = zeros[:, start:start + 128]
                assert int(block.sum()) == int(block.numel() * s) + 1, (name, start)
    overall = sum(int((lin.weight == 0).sum()) for lin in prunable_linears(model).values())
    total = sum(lin.weight.numel() for lin in prunable_linears(model).values())
    assert abs(overall / total - 0.5) < 0.01  # every block has the same linears, so the mean carries over


def _sequential_tests():
    """The sibling test module (its Wanda formula and block-by-block pruning by hand), loaded by path."""
    spec = importlib.util.spec_from_file_location("pruners_sequential_tests",
                                                  Path(__file__).with_name("test_pruners_sequential.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_uniform_profile_is_unchanged():
    """sparsity_profile="uniform" is the driver without OWL: every block at the target, each linear pruned by
    Wanda's formula on the inputs of the model pruned so far (on this model OWL's four ratios differ)."""
    by_hand, ids = _sequential_tests(), calibration()
    uniform, blocks = tiny_llama(), []
    prune_model(uniform, ids, PruneOptions("wanda", parse_pattern("unstructured", 0.5), sparsity_profile="uniform"),
                on_block=blocks.append)
    reference = tiny_llama()
    by_hand.sequentially_by_hand(
        reference, ids, lambda w, x: w.masked_fill(torch.from_numpy(by_hand.wanda_formula(w, x, 0.5)), 0))
    assert [b.sparsity for b in blocks] == [0.5] * BLOCKS
    for name, lin in prunable_linears(reference).items():
        assert torch.equal(prunable_linears(uniform)[name].weight == 0, lin.weight == 0), name


def test_owl_sparsities_formula_edge_cases():
    assert owl_sparsities([3.0, 3.0, 3.0], 0.7, 0.08) == [0.7, 0.7, 0.7]  # the reference would divide by zero
    two = owl_sparsities([1.0, 9.0], 0.5, 0.1)
    assert two == pytest.approx([0.6, 0.4], abs=1e-12)


def test_bad_owl_options_raise_before_any_change():
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        (dict(pattern=parse_pattern("2:4")), "sparsity_profile owl needs unstructured"),
        (dict(owl_lambda=0.0), "owl_lambda 0.0 is out of range"),
        (dict(owl_lambda=0.5), "owl_lambda 0.5 is out of range"),
        (dict(owl_lambda=-0.1), "owl_lambda -0.1 is out of range"),
        (dict(owl_threshold=0), "owl_threshold 0 is invalid"),
        (dict(owl_threshold=-2.0), "owl_threshold -2.0 is invalid"),
        (dict(sparsity_profile="layered"), "unknown sparsity_profile 'layered'"),
        (dict(pattern=parse_pattern("unstructured", 0.1), owl_lambda=0.3), "lower owl_lambda"),
    ]
    for options, message in cases:
        arguments = dict(pattern=parse_pattern("unstructured", 0.5), sparsity_profile="owl") | options
        with pytest.raises((PrunerOptionError, PatternError), match=message):
            prune_model(model, calibration(), PruneOptions("wanda", arguments.pop("pattern"), **arguments))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert find_decoder_blocks(model)[0] == "model.layers"
