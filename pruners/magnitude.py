"""Magnitude pruning (spec/pruners.md §1.8, §2.5): score |W|, no calibration data.

Unstructured: one `<=` threshold per matrix (int(numel*s)+1 zeros plus ties). N:M: the N smallest |W| of every
group of M consecutive inputs of every row.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from pruners.masks import SparsityPattern, nm_mask, unstructured_threshold_mask
from pruners.reports import LayerReport, layer_report


def magnitude_mask(weight: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Bool mask (out, in), True = prune, chosen from |weight| as the Wanda repo's `prune_magnitude` does."""
    score = weight.abs()  # the reference compares in the weight's own dtype (ties are common in fp16)
    if pattern.is_nm:
        return nm_mask(score.float(), pattern.n, pattern.m)
    return unstructured_threshold_mask(score, pattern.sparsity)


class MagnitudePruner:
    """Prunes one nn.Linear by weight magnitude; `add_batch` is a no-op because no statistics are needed."""

    needs_calibration = False

    def __init__(self, layer: nn.Linear, name: str) -> None:
        self.layer = layer
        self.name = name

    def add_batch(self, inp: torch.Tensor) -> None:
        pass

    def share_statistics(self, other: MagnitudePruner) -> None:
        pass

    @torch.no_grad()
    def prune(self, pattern: SparsityPattern) -> LayerReport:
        """Zero the selected weights of `self.layer` in place."""
        weight = self.layer.weight
        pattern.check_width(weight.shape[1], self.name)
        start = time.perf_counter()
        weight.masked_fill_(magnitude_mask(weight, pattern), 0)
        return layer_report(self.name, weight, time.perf_counter() - start)
