"""Wanda (spec/pruners.md §2): score |W_ij| * ||X_j||_2, no weight update.

Statistics (`WrappedGPT.add_batch`, fp32): scaler_row_j = (1/N_seq) * sum over calibration tokens of x_j^2.
Masks: exactly int(c*s) per output row (stable sort) by default; N:M per row and group; or, with `use_variant`,
the cumulative-sum rule of §2.2 whose alpha is bisected until the whole matrix is within 0.001 of the target.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from pruners.masks import SparsityPattern, nm_mask, per_row_mask
from pruners.reports import LayerReport, layer_report


def accumulate_input_norms(scaler_row: torch.Tensor, nsamples: int, inp: torch.Tensor) -> int:
    """Fold one batch of layer inputs (B, T, c) or (T, c) into `scaler_row` (c,) in place; return the new count.

    scaler_row <- scaler_row * n/(n+B) + ||x_j||^2 / (n+B), the norm over the batch's B*T tokens, in fp32.
    """
    if inp.dim() == 2:
        inp = inp.unsqueeze(0)
    batch = inp.shape[0]  # counts sequences, not tokens, as the reference does
    tokens = inp.reshape(-1, inp.shape[-1]).float()  # (B*T, c)
    scaler_row.mul_(nsamples / (nsamples + batch))
    nsamples += batch
    scaler_row.add_(torch.linalg.vector_norm(tokens, dim=0).square_().div_(nsamples))
    return nsamples


def accumulate_window_norms(scaler_row: torch.Tensor, nsamples: int, windows: torch.Tensor) -> int:
    """`accumulate_input_norms` for each window of `windows` (W, T, c) fp32 in turn, with the W column norms taken
    in one reduction (the same reduction per window, so the result is bit for bit the one-window loop's)."""
    squared = torch.linalg.vector_norm(windows, dim=1).square_()  # (W, c)
    for row in squared:
        scaler_row.mul_(nsamples / (nsamples + 1))
        nsamples += 1
        scaler_row.add_(row.div_(nsamples))
    return nsamples


def wanda_score(weight: torch.Tensor, scaler_row: torch.Tensor) -> torch.Tensor:
    """|W| * sqrt(scaler_row): (out, in) fp32 from a weight (out, in) and per-input statistics (in,)."""
    return weight.abs() * torch.sqrt(scaler_row.reshape(1, -1))


def variant_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The `--use_variant` rule: per row, prune while the ascending cumulative score stays <= alpha * row total.

    alpha starts at 0.4 in [0, 0.8] and is bisected until the matrix's sparsity is within 0.001 of the target or
    the bracket is narrower than 0.001 (the reference's `return_given_alpha` loop). A row where not even its
    smallest score fits under alpha * total prunes nothing (the reference would index position -1 there).
    """
    sorted_score = torch.sort(score, dim=-1, stable=True).values
    cumulative = torch.cumsum(sorted_score, dim=1)
    row_total = score.sum(dim=1)

    def mask_for(alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        count = (cumulative <= (row_total * alpha).reshape(-1, 1)).sum(dim=1, keepdim=True)
        threshold = torch.gather(sorted_score, 1, (count - 1).clamp_(min=0))
        threshold[count == 0] = -torch.inf
        mask = score <= threshold
        return mask, mask.sum() / mask.numel()

    alpha, low, high = 0.4, 0.0, 0.8
    mask, current = mask_for(alpha)
    while torch.abs(current - sparsity) > 0.001 and high - low >= 0.001:
        if current > sparsity:
            alpha, high = (alpha + low) / 2.0, alpha
        else:
            alpha, low = (alpha + high) / 2.0, alpha
        mask, current = mask_for(alpha)
    return mask


def wanda_mask(score: torch.Tensor, pattern: SparsityPattern, use_variant: bool = False) -> torch.Tensor:
    """Bool mask (out, in), True = prune, from a Wanda score matrix."""
    if pattern.is_nm:
        return nm_mask(score, pattern.n, pattern.m)
    if use_variant:
        return variant_mask(score, pattern.sparsity)
    return per_row_mask(score, pattern.sparsity)


class WandaPruner:
    """Observes the inputs of one nn.Linear (`add_batch`, from a forward hook), then prunes it (`prune`)."""

    needs_calibration = True

    def __init__(self, layer: nn.Linear, name: str, use_variant: bool = False) -> None:
        self.layer = layer
        self.name = name
        self.use_variant = use_variant
        self.scaler_row = torch.zeros(layer.in_features, dtype=torch.float32, device=layer.weight.device)
        self.nsamples = 0

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor) -> None:
        self.nsamples = accumulate_input_norms(self.scaler_row, self.nsamples, inp)

    @torch.no_grad()
    def add_windows(self, windows: torch.Tensor) -> None:
        """`add_batch` of each window of `windows` (W, T, c) fp32, in order."""
        self.nsamples = accumulate_window_norms(self.scaler_row, self.nsamples, windows)

    def share_statistics(self, other: WandaPruner) -> None:
        """Use `other`'s statistics (a linear fed the very same input tensor, e.g. k_proj beside q_proj)."""
        self.scaler_row, self.nsamples = other.scaler_row, other.nsamples

    @torch.no_grad()
    def prune(self, pattern: SparsityPattern) -> LayerReport:
        """Zero the selected weights of `self.layer` in place."""
        weight = self.layer.weight
        pattern.check_width(weight.shape[1], self.name)
        if self.nsamples == 0:
            raise RuntimeError(f"wanda: no calibration input reached {self.name}")
        start = time.perf_counter()
        mask = wanda_mask(wanda_score(weight, self.scaler_row), pattern, self.use_variant)
        weight.masked_fill_(mask, 0)
        self.scaler_row = None
        return layer_report(self.name, weight, time.perf_counter() - start)
