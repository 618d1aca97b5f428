"""Patterns and mask rules (pruners/masks.py) against independent numpy formulas."""

import numpy as np
import pytest
import torch

from pruners.masks import (
    PatternError,
    SparsityPattern,
    nm_mask,
    parse_pattern,
    per_row_mask,
    unstructured_threshold_mask,
)


def test_parse_pattern_accepts_unstructured_and_any_nm():
    assert parse_pattern("unstructured", 0.7) == SparsityPattern(0.7)
    assert parse_pattern() == SparsityPattern(0.5)
    assert parse_pattern("2:4") == SparsityPattern(0.5, 2, 4)
    assert parse_pattern(" 4:8 ", 0.5) == SparsityPattern(0.5, 4, 8)
    assert parse_pattern("1:4") == SparsityPattern(0.25, 1, 4)
    assert str(parse_pattern("2:4")) == "2:4" and str(parse_pattern("unstructured", 0.3)) == "unstructured"
    assert parse_pattern("2:4").is_nm and not parse_pattern("unstructured", 0.5).is_nm


@pytest.mark.parametrize(
    ("pattern", "sparsity", "message"),
    [
        ("4:2", None, "N:M 4:2 is invalid: need 0 < N < M (e.g. 2:4)"),
        ("0:4", None, "need 0 < N < M"),
        ("unstructured", 1.5, "sparsity 1.5 is out of range: use a value in (0, 1)"),
        ("unstructured", 0.0, "out of range"),
        ("unstructured", float("nan"), "out of range"),
        ("2:4", 0.7, "--sparsity 0.7 contradicts pattern 2:4 (= 0.5)"),
        ("blocky", None, "is not recognised"),
        (124, None, "quote it in YAML"),
    ],
)
def test_parse_pattern_rejects_with_one_line(pattern, sparsity, message):
    with pytest.raises(PatternError) as caught:
        parse_pattern(pattern, sparsity)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_width_check_names_layer_and_width():
    with pytest.raises(PatternError, match=r"model\.layers\.0\.mlp\.down_proj.*100 input features.*M=8"):
        parse_pattern("4:8").check_width(100, "model.layers.0.mlp.down_proj")
    parse_pattern("4:8").check_width(96, "ok")  # no error


def test_unstructured_threshold_mask_is_the_reference_le_rule():
    score = torch.rand(37, 53, generator=torch.Generator().manual_seed(0))
    mask = unstructured_threshold_mask(score, 0.5)
    flat = np.sort(score.numpy().ravel())
    threshold = flat[int(score.numel() * 0.5)]
    assert np.array_equal(mask.numpy(), score.numpy() <= threshold)
    assert int(mask.sum()) == int(score.numel() * 0.5) + 1  # the reference prunes one more than numel*s


def test_unstructured_threshold_mask_prunes_ties():
    score = torch.tensor([[1.0, 2.0, 2.0, 2.0], [3.0, 4.0, 5.0, 6.0]])
    assert int(unstructured_threshold_mask(score, 0.25).sum()) == 4  # thresh = 2.0: all three ties go


def test_per_row_mask_exact_count_and_stable_ties():
    score = torch.rand(16, 40, generator=torch.Generator().manual_seed(1))
    mask = per_row_mask(score, 0.7)
    count = int(40 * 0.7)
    assert mask.sum(dim=1).tolist() == [count] * 16
    expected = np.zeros((16, 40), dtype=bool)
    for row in range(16):
        expected[row, np.argsort(score[row].numpy(), kind="stable")[:count]] = True
    assert np.array_equal(mask.numpy(), expected)
    tied = per_row_mask(torch.ones(1, 8), 0.5)  # all equal: the first four columns
    assert tied[0].tolist() == [True] * 4 + [False] * 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_per_row_mask_equals_stable_sort_under_heavy_ties(dtype, sparsity):
    score = torch.randint(0, 5, (20, 48), generator=torch.Generator().manual_seed(4)).to(dtype)
    count = int(48 * sparsity)
    expected = np.zeros((20, 48), dtype=bool)
    for row in range(20):
        expected[row, np.argsort(score[row].float().numpy(), kind="stable")[:count]] = True
    assert np.array_equal(per_row_mask(score, sparsity).numpy(), expected)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_mask_matches_group_formula(n, m):
    score = torch.rand(12, 64, generator=torch.Generator().manual_seed(2))
    mask = nm_mask(score, n, m).numpy()
    expected = np.zeros_like(mask)
    for row in range(12):
        for start in range(0, 64, m):
            expected[row, start + np.argsort(score[row, start:start + m].numpy())[:n]] = True
    assert np.array_equal(mask, expected)
    assert (mask.reshape(12, -1, m).sum(-1) == n).all()
